"""Evaluation of model-written code: a sandbox, HumanEval pass@k, HumanEval infilling (FIM) and
an insecure-code rate. See docs/eval.md.

    nanoseek eval sandbox
    nanoseek eval humaneval --samples samples.jsonl

Modules: sandbox (isolation, run_program, pool), humaneval, fim, security, passk, tasks
(generation plug-in `run_task`), common (JSONL, resumable results), cli.
"""
