"""Evaluation of model-written code: a sandbox, HumanEval pass@k, HumanEval infilling (FIM) and
an insecure-code rate, bits per byte. See docs/eval.md.

    nanoseek eval sandbox
    nanoseek eval humaneval --samples samples.jsonl

Modules: sandbox (isolation, run_program, pool), humaneval, fim, security, bpb, passk, tasks
(generation plug-in `run_task`), generation (samples from a checkpoint via the engine), report
(the run report's evaluation section), common (JSONL, resumable results), cli.
"""
