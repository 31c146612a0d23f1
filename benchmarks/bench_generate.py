"""Benchmark: nanoseek's generation engine vs transformers' `generate` on the same weights.

On the `small` config (random init, saved with save_pretrained and loaded by
transformers.AutoModelForCausalLM in the same process) it measures:
  * batch-1 greedy decode tokens/s after a 512-token prompt: nanoseek.generate_stream vs HF
    generate (with a streamer): (N - 1) tokens / time from the first generated token to the last,
    so prefill is excluded for both; runs alternate between the two;
  * aggregate decode tokens/s with 8 concurrent requests vs 1 (continuous-batching engine);
  * decode-cache bytes per token at 8K context: nanoseek's DecodeCache (preallocated, exact),
    transformers' cache after a prefill (measured at --hf-context tokens and, if shorter than 8K,
    extrapolated linearly from two lengths), and a dense Llama of the same width (computed:
    2 (K,V) x layers x kv_heads x head_dim x 4 bytes fp32, with kv_heads = attention heads).
  * with --spec-checkpoint CKPT (a trained checkpoint with its MTP module, e.g. a speedrun's):
    MTP speculative decoding vs plain decoding on code prompts, through the Python API, the
    continuous-batching Engine and the HTTP server (in-process), greedy (identical outputs
    checked) and sampled (--spec-temperature/--spec-top-p): acceptance rate, tokens per
    verification call and the speed-up vs plain decoding measured in the same run.
and prints the ratios. Timings are medians of --reps runs; only same-run ratios mean anything.

    python benchmarks/bench_generate.py            # ~5 min on 2 busy cores
    python benchmarks/bench_generate.py --quick    # fewer tokens
    python benchmarks/bench_generate.py --threads 1
    python benchmarks/bench_generate.py --threads 1 --compile   # + torch.compile'd decode (minutes to compile)
    python benchmarks/bench_generate.py --long-context 4096 16384  # long prompts only (see below)

--long-context N ...: for each prompt length N, the eager prefill into a cache and the eager batch-1
decode step after it, with the model's defaults (CSA attends to gathered top-k entries past its
thresholds, docs/model.md "Speed") against every CSA call masked over all entries
(`Attention.sparse_gather = False`), alternating in one process; prints times and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import generate, generate_stream
from nanoseek.model import count_parameters


def transformers_decode(model, prompt: list[int], n: int):
    """Load `model`'s weights into transformers (via our checkpoint format) and return
    (hf_model, once): once() runs a greedy `generate` of n tokens after `prompt` and returns the
    decode rate in tok/s, timed from the first generated token to the last with a streamer, so
    the prefill is excluded (the same measure as nanoseek's side)."""
    from transformers.generation.streamers import BaseStreamer

    from bench_model import in_transformers  # benchmarks/ is the script's directory

    hf = in_transformers(model).eval()
    ids = torch.tensor([prompt])

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):  # first call: the prompt; then one call per new token
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def once() -> float:
        clock = Clock()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=model.config.eos_token_id, streamer=clock)
        assert out.shape[1] == len(prompt) + n
        st = clock.stamps[1:]
        return (len(st) - 1) / (st[-1] - st[0])

    return hf, once


def aggregate_rate(model, prompts, n: int) -> float:
    """Tokens/s over the window where every request is decoding (prefills excluded)."""
    started, count, t0 = set(), 0, None
    for ev in generate_stream(model, prompts, n, stop_on_eos=False):
        if t0 is not None:
            count += len(ev.tokens)
        started.add(ev.index)
        if t0 is None and len(started) == len(prompts):
            t0 = time.perf_counter()
    return count / (time.perf_counter() - t0)


def tensor_bytes(obj, seen=None, depth=0) -> int:
    """Bytes of all tensors reachable from a (transformers) cache object."""
    seen = set() if seen is None else seen
    if depth > 6:
        return 0
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel())
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen, depth + 1) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        return sum(tensor_bytes(x, seen, depth + 1) for x in vars(obj).values())
    return 0


def hf_cache_bytes(hf, vocab: int, length: int) -> int:
    ids = torch.randint(32, vocab, (1, length))
    with torch.no_grad():
        out = hf(ids, use_cache=True, logits_to_keep=1)
    return tensor_bytes(out.past_key_values)


SPEC_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n",
                "class Stack:\n    def __init__(self):\n"]


def _ratio_line(plain_t: list[float], spec_t: list[float], tokens: list[int]) -> str:
    """Speed-up as the median per-run time ratio, and the aggregate tok/s of both."""
    ratio = statistics.median(p / s for p, s in zip(plain_t, spec_t))
    return (f"plain {sum(tokens) / sum(plain_t):6.1f} tok/s, speculative {sum(tokens) / sum(spec_t):6.1f} tok/s, "
            f"speed-up {ratio:.2f}x (median of {len(plain_t)} runs)")


def bench_speculative(ckpt: str, tok_dir: str | None, num_draft: int, new_tokens: int, reps: int,
                      temperature: float = 0.8, top_p: float = 0.95) -> None:
    """MTP speculative decoding on a trained checkpoint, three ways, each against plain decoding
    in the same run (alternating): the Python API (`speculative_generate`), the
    continuous-batching Engine, and the HTTP server (in-process uvicorn, /v1/completions).
    Greedy (outputs must be identical) and sampled (temperature/top-p; same distribution)."""
    from nanoseek.data.tokenizer import load_tokenizer

    model = Transformer.from_pretrained(ckpt).eval()
    tok = load_tokenizer(tok_dir or ckpt)
    encoded = [tok.encode(t, add_bos=True) for t in SPEC_PROMPTS]
    print(f"MTP speculative decoding, {num_draft} drafts per round, {ckpt}: {new_tokens} new tokens per request, "
          f"{len(SPEC_PROMPTS)} code prompts x {reps} reps, threads={torch.get_num_threads()}")
    _spec_api(model, encoded, num_draft, new_tokens, reps)
    _spec_engine_and_server(model, tok, encoded, num_draft, new_tokens, reps, temperature, top_p)


def _spec_api(model, encoded: list[list[int]], num_draft: int, new_tokens: int, reps: int) -> None:
    """1. The Python API (batch 1), greedy: prefill included in both timings."""
    from nanoseek.engine.generate import speculative_generate

    plain_t, spec_t, toks, acc, per_call = [], [], [], [], []
    for _ in range(reps):
        for ids in encoded:
            t = time.perf_counter()
            plain = generate(model, ids, new_tokens, stop_on_eos=False)
            plain_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            spec, stats = speculative_generate(model, ids, new_tokens, num_draft=num_draft, stop_ids=())
            spec_t.append(time.perf_counter() - t)
            if spec != plain:
                raise SystemExit("speculative output differs from plain greedy decoding")
            toks.append(len(plain))
            acc.append(stats.acceptance_rate)
            per_call.append(stats.tokens_per_call)
    print(f"  API greedy:    acceptance {statistics.mean(acc):.1%}, {statistics.mean(per_call):.2f} tokens per "
          f"main-model call (prefill counted), outputs identical; {_ratio_line(plain_t, spec_t, toks)}")


def _start_servers(engines: dict, tok) -> dict:
    """An in-process uvicorn server per engine: {k: (server, base URL)}; {} without the server
    extras."""
    import socket
    import threading

    try:
        import uvicorn

        from nanoseek.serve.app import create_app
    except ImportError as e:  # the server extras are not installed: engine numbers only
        print(f"  (server path skipped: {e})")
        return {}
    servers = {}
    for k, eng in engines.items():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        srv = uvicorn.Server(uvicorn.Config(create_app(eng, tok), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.05)
        servers[k] = (srv, f"http://127.0.0.1:{port}")
    return servers


def _engine_once(engine, ids: list[int], new_tokens: int, temperature: float, top_p: float, seed: int):
    """One request through the Engine: (tokens, how many, seconds)."""
    from nanoseek.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    t = time.perf_counter()
    out = [x for d in engine.submit(ids, params) for x in d.tokens]
    return out, len(out), time.perf_counter() - t


def _server_once(url: str, text: str, new_tokens: int, temperature: float, top_p: float, seed: int):
    """One /v1/completions request: (text, completion tokens, seconds)."""
    import json
    import urllib.request

    body = {"model": "nanoseek", "prompt": text, "max_tokens": new_tokens, "seed": seed,
            "temperature": temperature, "top_p": top_p}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        res = json.load(r)
    return res["choices"][0]["text"], res["usage"]["completion_tokens"], time.perf_counter() - t


def _spec_engine_and_server(model, tok, encoded, num_draft: int, new_tokens: int, reps: int,
                            temperature: float, top_p: float) -> None:
    """2. The Engine and 3. the server: one engine per setting, requests one at a time, greedy
    and sampled."""
    from nanoseek.engine import Engine

    engines = {k: Engine(model, tokenizer=tok, max_batch=4, max_len=1024, speculative_tokens=k).start()
               for k in (0, num_draft)}
    servers = _start_servers(engines, tok)
    try:
        for path in ("engine", "server") if servers else ("engine",):
            for greedy in (True, False):
                temp, tp = (0.0, 1.0) if greedy else (temperature, top_p)

                def once(k, i, seed, path=path, temp=temp, tp=tp):
                    if path == "engine":
                        return _engine_once(engines[k], encoded[i], new_tokens, temp, tp, seed)
                    return _server_once(servers[k][1], SPEC_PROMPTS[i], new_tokens, temp, tp, seed)

                mode = "greedy " if greedy else f"T={temperature:g} top_p={top_p:g}"
                _spec_compare(path, mode, greedy, once, engines[num_draft], num_draft, new_tokens, reps)
    finally:
        for srv, _ in servers.values():
            srv.should_exit = True
        for eng in engines.values():
            eng.stop()


def _spec_compare(path: str, mode: str, greedy: bool, once, spec_engine, num_draft: int, new_tokens: int,
                  reps: int) -> None:
    """Plain (k = 0) and speculative requests alternating over every prompt, `reps` times; prints
    the acceptance (from the speculative engine's counters) and the speed-up."""
    plain_t, spec_t, toks = [], [], []
    c0 = dict(spec_engine.stats()["speculative"])
    for rep in range(reps):
        for i in range(len(SPEC_PROMPTS)):
            seed = 1000 * rep + i
            a, na, ta = once(0, i, seed)
            b, nb, tb = once(num_draft, i, seed)
            n = na
            if path == "server":
                # the server stops at EOS, so two sampled answers may differ in length: compare
                # time per token (scaled to new_tokens)
                n = new_tokens
                ta, tb = ta / max(na, 1) * n, tb / max(nb, 1) * n
            plain_t.append(ta)
            spec_t.append(tb)
            toks.append(n)
            if greedy and a != b:
                raise SystemExit(f"{path}: speculative greedy output differs from plain")
    c1 = dict(spec_engine.stats()["speculative"])
    drafted, accepted = c1["drafted"] - c0["drafted"], c1["accepted"] - c0["accepted"]
    rounds = c1["rounds"] - c0["rounds"]
    emitted = accepted + rounds  # each round emits its accepted drafts + one token
    print(f"  {path:6s} {mode}: acceptance {accepted / max(drafted, 1):.1%}, "
          f"{emitted / max(rounds, 1):.2f} tokens per verification call"
          f"{', outputs identical' if greedy else ''}; {_ratio_line(plain_t, spec_t, toks)}")


def bench_long_context(model, lengths: list[int], reps: int) -> None:
    """Prefill and decode at long prompts: the defaults against masked CSA (module docstring)."""
    from nanoseek.model.attention import Attention

    vocab = model.config.vocab_size
    for n in lengths:
        ids = torch.randint(32, vocab, (1, n), generator=torch.Generator().manual_seed(n))
        times: dict[tuple[str, bool], list[float]] = {(part, on): [] for part in ("prefill", "decode") for on in (False, True)}
        caches = {}
        with torch.no_grad():
            for _ in range(reps):
                for on in (False, True):
                    Attention.sparse_gather = on
                    caches[on] = cache = model.new_cache(1, n + 8 * reps + 8)
                    t = time.perf_counter()
                    tok = model(ids, cache=cache)[:, -1:].argmax(-1)
                    times[("prefill", on)].append(time.perf_counter() - t)
            for _ in range(reps):   # decode steps continue each mode's own cache
                for on in (False, True):
                    Attention.sparse_gather = on
                    t = time.perf_counter()
                    for _ in range(8):
                        tok = model(tok, cache=caches[on])[:, -1:].argmax(-1)
                    times[("decode", on)].append((time.perf_counter() - t) / 8)
        Attention.sparse_gather = True
        med = {key: statistics.median(v) for key, v in times.items()}
        print(f"prompt {n:6d}: prefill {med[('prefill', True)]:7.2f} s (masked CSA {med[('prefill', False)]:7.2f} s, "
              f"{med[('prefill', False)] / med[('prefill', True)]:.2f}x), eager decode step "
              f"{med[('decode', True)] * 1e3:6.1f} ms (masked {med[('decode', False)] * 1e3:6.1f} ms, "
              f"{med[('decode', False)] / med[('decode', True)]:.2f}x)")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=8192, help="context for cache bytes/token")
    ap.add_argument("--hf-context", type=int, default=2048, help="longest prefill run through transformers")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also time batch-1 decode with compile=True (a compiled copy; see bench_compile.py)")
    ap.add_argument("--spec-checkpoint", help="trained checkpoint: measure MTP speculative decoding only")
    ap.add_argument("--spec-tokenizer", help="tokenizer dir for --spec-checkpoint (default: the checkpoint dir)")
    ap.add_argument("--spec-draft", type=int, default=2, help="draft tokens per round")
    ap.add_argument("--spec-temperature", type=float, default=0.8, help="sampled speculative runs")
    ap.add_argument("--spec-top-p", type=float, default=0.95)
    ap.add_argument("--long-context", type=int, nargs="+", metavar="N",
                    help="only: prefill and decode at these prompt lengths, gathered vs masked CSA")
    args = ap.parse_args()
    if args.long_context and min(args.long_context) < 1:
        ap.error("--long-context lengths must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.new_tokens or (16 if args.quick else 48)
    if args.spec_checkpoint:
        bench_speculative(args.spec_checkpoint, args.spec_tokenizer, args.spec_draft, n, args.reps,
                          args.spec_temperature, args.spec_top_p)
        return
    torch.manual_seed(0)
    config = ModelConfig.from_preset("small")
    model = Transformer(config).eval()
    if args.long_context:
        print(f"small config, threads={torch.get_num_threads()}, medians of {args.reps} alternating runs")
        bench_long_context(model, args.long_context, args.reps)
        return
    print(f"small config, threads={torch.get_num_threads()}, prompt {args.prompt} tokens, {n} new tokens")
    prompt = torch.randint(32, config.vocab_size, (args.prompt,)).tolist()
    hf = bench_batch1_decode(model, prompt, n, args)
    bench_aggregate(model, n, args.reps)
    bench_cache_bytes(model, hf, args.context, args.hf_context)


def _stream_rate(model, prompt: list[int], n: int, **kw) -> float:
    """Decode tok/s of one `generate_stream` call: (n - 1) tokens over the time from the first
    generated token to the last (streaming timestamps), so the prefill is excluded."""
    stamps = [time.perf_counter() for ev in generate_stream(model, prompt, n, stop_on_eos=False, **kw)
              for _ in ev.tokens]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _runs(rates: list[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


def bench_batch1_decode(model, prompt: list[int], n: int, args):
    """Batch-1 decode, prefill excluded for both (streaming timestamps), nanoseek (default
    options) against transformers' `generate` and, with --compile, a compiled copy; runs
    alternate so that load drift on a shared machine hits all alike. Returns transformers'
    model (None when skipped)."""
    runs: dict[str, list[float]] = {"nanoseek": [], "transformers": [], "compiled": []}
    compiled_model = None
    if args.compile:  # a compiled copy of the same weights (compile_blocks works in place)
        import copy

        compiled_model = copy.deepcopy(model)
        t_c = time.perf_counter()
        _stream_rate(compiled_model, prompt, n, compile=True)
        print(f"compile=True: first generation (compilation + {n} tokens) {time.perf_counter() - t_c:.1f} s")
    hf = hf_once = None
    if not args.skip_transformers:
        hf, hf_once = transformers_decode(model, prompt, n)
    for _ in range(args.reps):
        runs["nanoseek"].append(_stream_rate(model, prompt, n))
        if compiled_model is not None:
            runs["compiled"].append(_stream_rate(compiled_model, prompt, n, compile=True))
        if hf_once is not None:
            runs["transformers"].append(hf_once())
    ours = statistics.median(runs["nanoseek"])
    print(f"nanoseek.generate     batch-1 decode: {ours:7.1f} tok/s  (runs: {_runs(runs['nanoseek'])})")
    if hf is not None:
        theirs = statistics.median(runs["transformers"])
        print(f"transformers.generate batch-1 decode: {theirs:7.1f} tok/s  (runs: {_runs(runs['transformers'])})")
        print(f"  ratio nanoseek / transformers: {ours / theirs:.2f}x (target >= 4x)")
    if runs["compiled"]:
        comp = statistics.median(runs["compiled"])
        print(f"nanoseek compile=True batch-1 decode: {comp:7.1f} tok/s  (runs: {_runs(runs['compiled'])})")
        print(f"  ratio compiled / eager: {comp / ours:.2f}x" +
              (f", compiled / transformers: {comp / statistics.median(runs['transformers']):.2f}x (target >= 4x)"
               if runs["transformers"] else ""))
        if hf is not None:
            _greedy_agreement(model, hf, prompt)
    return hf


def _greedy_agreement(model, hf, prompt: list[int]) -> None:
    """Same greedy tokens? Random-init logits have near-ties (top-2 margins ~1e-4 occur), so the
    two implementations may part ways after a few tokens; report the agreeing prefix."""
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=model.config.eos_token_id)[0, len(prompt):].tolist()
    mine = generate(model, prompt, 8, stop_on_eos=False)
    agree = next((i for i, (a, b) in enumerate(zip(ref, mine)) if a != b), 8)
    print(f"  greedy tokens: first {agree} of 8 agree with transformers")


def bench_aggregate(model, n: int, reps: int) -> None:
    """Aggregate decode tok/s of 8 concurrent requests against 1 (64-token prompts)."""
    short = 64
    prompts = [torch.randint(32, model.config.vocab_size, (short,)).tolist() for _ in range(8)]
    one = statistics.median(aggregate_rate(model, prompts[:1], n) for _ in range(reps))
    eight = statistics.median(aggregate_rate(model, prompts, n) for _ in range(reps))
    print(f"aggregate decode ({short}-token prompts): 1 request {one:7.1f} tok/s, 8 concurrent {eight:7.1f} tok/s")
    print(f"  ratio 8 / 1: {eight / one:.2f}x (if a step cost only its weight reads: "
          f"{weight_read_ratio(model.config, 8):.2f}x, as 8 rows read the routed experts any of them picks)")


def weight_read_ratio(config, rows: int) -> float:
    """Aggregate decode speed-up of `rows` rows over one if each step cost only the fp32
    weights it reads: one row reads its k routed experts per layer, `rows` rows every expert
    any of them picks (expected E (1 - (1 - k/E)^rows) under uniform routing); everything else
    once (the embedding table: a row each, left out)."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    expert = 3 * config.moe_intermediate_size * config.hidden_size
    one = count_parameters(config, activated=True, include_mtp=False) - config.vocab_size * config.hidden_size
    shared = one - config.num_hidden_layers * k * expert  # what every step reads whatever the rows
    distinct = e * (1 - (1 - k / e) ** rows)
    return rows * one / (shared + config.num_hidden_layers * distinct * expert)


def bench_cache_bytes(model, hf, context: int, hf_context: int) -> None:
    """Decode-cache bytes per token at `context` tokens: nanoseek, transformers (measured, or
    extrapolated from two shorter prefills), and a dense Llama of the same width."""
    config, L = model.config, context
    ours_b = model.new_cache(1, L).nbytes() / L
    llama_b = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * 4
    print(f"cache bytes/token at {L} context: nanoseek {ours_b:8.1f} B (fp32, {model.new_cache(1, L).nbytes() / 2**20:.2f} MiB)")
    if hf is not None:
        if hf_context >= L:
            hf_b = hf_cache_bytes(hf, config.vocab_size, L) / L
            how = "measured"
        else:
            a, b = hf_context // 2, hf_context
            ba, bb = hf_cache_bytes(hf, config.vocab_size, a), hf_cache_bytes(hf, config.vocab_size, b)
            slope = (bb - ba) / (b - a)
            hf_b = (bb + slope * (L - b)) / L
            how = f"extrapolated from {a} and {b} tokens ({bb / b:.1f} B/token at {b})"
        print(f"                                  transformers {hf_b:8.1f} B ({how})")
        print(f"  ratio transformers / nanoseek: {hf_b / ours_b:.2f}x")
    print(f"                                  dense Llama (same width, MHA, fp32) {llama_b:8.1f} B")
    print(f"  ratio Llama / nanoseek: {llama_b / ours_b:.1f}x")


if __name__ == "__main__":
    main()
