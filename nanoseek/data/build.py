"""`nanoseek data build`: turn source code into a clean, deduplicated, license-aware, secret-free,
decontaminated JSONL corpus with a group-level train/val split.

    nanoseek data build --out runs/corpus                     # embedded default (stdlib + site-packages)
    nanoseek data build --source ~/wheelhouse --source ~/src --out runs/corpus --max-mb 500
    python -c "from nanoseek.data.build import build_corpus; build_corpus('runs/corpus', max_mb=50)"

Pipeline (docs/data.md has the details and the measured numbers):
  sources.py   list the sources (main process), read files / archives / table rows (workers)
  clean.py     language filter -> binary / UTF-8 check -> license policy -> quality heuristics
               -> decontamination (HumanEval n-grams) -> secret & PII redaction (+ re-scan)
  dedup.py     exact (BLAKE2b) then near (MinHash/LSH, Jaccard >= 0.7) deduplication, first copy wins
  here         documents are hashed by group into buckets; whole buckets become the val split
               (deterministic by seed, never splitting a repository/package); manifest + summary.

Output layout:
  DIR/train/part-NNNNN.jsonl, DIR/val/part-NNNNN.jsonl   one JSON object per line:
      {"id", "repo", "path", "lang", "license", "source", "content"}
  DIR/manifest.json   configuration, every drop reason with file/byte counts and examples,
                      redaction counts, languages, licenses, split, throughput, and three
                      digests: `fingerprint` (the settings), `inputs_digest` (what was read:
                      a rerun with unchanged settings rebuilds when it changed) and
                      `content_digest` (what was written: the tokenizer and shards key on it).
                      Written last: its presence marks a finished build.
  DIR/summary.md      the same, for people
  DIR/groups.tsv      group  split  files  bytes
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanoseek.data import clean, dedup, licenses
from nanoseek.data import sources as srcs
from nanoseek.jsonl import read_jsonl

PIPELINE_VERSION = 1   # bump when filters change what a build produces
_EXAMPLES = 3          # example paths kept per drop reason in the manifest
_BUILDING = ".building"


@dataclass
class BuildConfig:
    sources: list[str] = field(default_factory=lambda: ["default"])
    languages: list[str] | None = None           # None: every language srcs.py knows
    license_policy: str = "permissive"           # a key of licenses.POLICIES
    max_mb: float | None = None                  # cap on source bytes read (sampled across files)
    min_bytes: int = 32
    max_bytes: int = 1 << 20
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    near_dedup: bool = True
    near_dup_threshold: float = dedup.DEFAULT_THRESHOLD
    decontaminate: bool = True
    decontam_extra: list[str] = field(default_factory=list)   # extra JSONL evaluation sets
    val_fraction: float = 0.05
    seed: int = 0
    num_buckets: int = 64

    def quality(self) -> clean.QualityConfig:
        return clean.QualityConfig(self.max_line_length, self.max_mean_line_length, self.min_alnum_fraction)

    def fingerprint(self) -> str:
        d = asdict(self)
        d["pipeline_version"] = PIPELINE_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Worker side

@dataclass
class _Doc:
    digest: bytes
    sig: object          # np.ndarray | None
    group: str
    bucket: int
    lang: str
    license: str | None
    nbytes: int
    line: bytes
    where: str


@dataclass
class _Result:
    docs: list[_Doc] = field(default_factory=list)
    drops: dict = field(default_factory=dict)          # reason -> [files, bytes, examples]
    redactions: Counter = field(default_factory=Counter)
    contaminated_by: Counter = field(default_factory=Counter)
    files_seen: int = 0
    bytes_read: int = 0
    not_code: int = 0

    def drop(self, reason: str, size: int, where: str, message: str = "") -> None:
        d = self.drops.setdefault(reason, [0, 0, []])
        d[0] += 1
        d[1] += size
        if len(d[2]) < _EXAMPLES:
            d[2].append(f"{where}: {message}" if message else where)


_W: dict = {}   # per-process worker state set by _init_worker


def _init_worker(cfg: BuildConfig, decontaminator) -> None:
    _W["cfg"] = cfg
    _W["quality"] = cfg.quality()
    _W["limits"] = srcs.SizeLimits(cfg.min_bytes, cfg.max_bytes)
    _W["languages"] = frozenset(cfg.languages) if cfg.languages else None
    _W["allowed"] = frozenset(licenses.POLICIES[cfg.license_policy])
    _W["decontam"] = decontaminator


def mp_context():
    """Worker processes: fork on Linux (no re-import of torch, which `import nanoseek` pulls in and
    which costs seconds per worker on a small machine; the workers never use torch or threads),
    spawn elsewhere (fork is unsafe on macOS)."""
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


_TSV_ESC = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(s: str) -> str:
    """A TSV cell: backslash, tab, CR and LF escaped (\\, \\t, \\r, \\n), so a name cannot forge rows."""
    return s.translate(_TSV_ESC)


def printable(s: str) -> str:
    """Text safe for a terminal: control characters (ESC sequences, CR, ...) shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


def _bucket(seed: int, group: str, n: int) -> int:
    h = hashlib.blake2b(f"{seed}\0{group}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") % n


def _clean(raw: srcs.RawDoc, res: _Result) -> None:
    cfg: BuildConfig = _W["cfg"]
    where = raw.where or f"{raw.source}:{raw.group}/{raw.path}"
    if _W["languages"] is not None and raw.lang not in _W["languages"]:
        res.drop("language_filtered", raw.size, where, raw.lang)
        return
    if isinstance(raw.data, bytes):
        data = raw.data
        if b"\0" in data[:8192]:
            res.drop("binary", raw.size, where)
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            res.drop("invalid_utf8", raw.size, where, f"byte {e.start}")
            return
    else:
        text = raw.data
        if "\0" in text[:8192]:
            res.drop("binary", raw.size, where)
            return
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            res.drop("invalid_utf8", raw.size, where, f"lone surrogate at char {e.start}")
            return
    if text.startswith("\ufeff") or "\r" in text:
        # One newline convention: CRLF and a BOM only cost tokens.
        text = text.removeprefix("\ufeff").replace("\r\n", "\n")
        data = text.encode("utf-8")
    lic = licenses.from_spdx_header(text) or raw.license
    cat = licenses.classify(lic)
    if cat not in _W["allowed"]:
        res.drop(f"license_{cat}", raw.size, where, lic or "no license found")
        return
    reason = clean.quality_reason(text, data, _W["quality"])
    if reason:
        res.drop(reason, raw.size, where)
        return
    tokens = dedup.token_hashes(data)
    dec = _W["decontam"]
    if dec is not None:
        bench = dec.match(tokens)
        if bench:
            res.drop("contaminated", raw.size, where, bench)
            res.contaminated_by[bench] += 1
            return
    redacted, counts = clean.redact_secrets(text)
    if counts:
        if clean.find_secrets(redacted):
            res.drop("secret_unredactable", raw.size, where)
            return
        res.redactions.update(counts)
        text = redacted
        data = text.encode("utf-8")
    elif "PRIVATE KEY" in text and clean.find_secrets(text):
        res.drop("secret_unredactable", raw.size, where)
        return
    digest = dedup.content_digest(data)
    sig = dedup.signature_from_shingles(dedup.ngram_hashes(tokens, dedup.SHINGLE, short=True)) if cfg.near_dedup else None
    rec = {"id": digest.hex(), "repo": raw.group, "path": raw.path, "lang": raw.lang, "license": lic,
           "source": raw.source, "content": text}
    line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
    res.docs.append(_Doc(digest, sig, raw.group, _bucket(cfg.seed, raw.group, cfg.num_buckets), raw.lang, lic,
                         len(data), line, where))


def _process_task(task: srcs.Task) -> _Result:
    """Read and clean one task. Never raises on bad input: an error nobody anticipated drops the
    whole task (nothing from it is kept) with its reason in the manifest, and the build goes on."""
    try:
        return _process_task_items(task)
    except (Exception, RecursionError) as e:  # noqa: BLE001 - hostile input must not kill the build
        res = _Result()
        where = task.path or (task.files[0].path if task.files else task.source)
        n = max(len(task.files), 1)
        res.files_seen += n
        res.bytes_read += task.est_bytes
        res.drop("unreadable", task.est_bytes, where, f"task dropped whole: {type(e).__name__}: {e}"[:300])
        res.drops["unreadable"][0] = n
        return res


def _process_task_items(task: srcs.Task) -> _Result:
    res = _Result()
    for item in srcs.read_task(task, _W["limits"]):
        if isinstance(item, srcs.Skip):
            if item.reason == "not_code":
                res.not_code += 1
                continue
            res.files_seen += 1
            # Members skipped by size or path before reading do not count as bytes read.
            if item.reason not in ("too_large", "vendored", "minified", "auto_generated") or item.message:
                res.bytes_read += item.size
            res.drop(item.reason, item.size, item.where, item.message)
            continue
        res.files_seen += 1
        res.bytes_read += item.size
        _clean(item, res)
    return res


# ---------------------------------------------------------------------------------------------
# Main process

def _existing_build(out: Path, cfg: BuildConfig, force: bool) -> dict | None:
    """The manifest of a finished build in `out` with these settings (None if there is none, or
    with force). Raises if `out` holds a build with other settings (unless force) or anything
    that is not a nanoseek corpus: neither is overwritten by mistake."""
    manifest = out / "manifest.json"
    if manifest.is_file() and not (out / _BUILDING).exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = {}
        old = old if isinstance(old, dict) else {}
        if force:
            return None
        if old.get("fingerprint") == cfg.fingerprint():
            return old
        raise FileExistsError(f"{out} holds a corpus built with different settings; "
                              f"pass --force (force=True) to rebuild it")
    if out.exists() and any(out.iterdir()) and not ((out / _BUILDING).exists() or manifest.is_file()):
        raise FileExistsError(f"{out} exists and is not a nanoseek corpus; refusing to overwrite it")
    return None


def _reset_out(out: Path) -> None:
    """Remove a previous (finished or interrupted) build from `out` and mark a build in progress."""
    for name in ("train", "val", ".staging", "manifest.json", "summary.md", "groups.tsv", _BUILDING):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / _BUILDING).write_text("a build is in progress (or was interrupted)\n")


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}\0missing"
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def inputs_digest(refs: list[srcs.FileRef], enum: srcs.Enumerated, cfg: BuildConfig) -> str:
    """A cheap signature of what a build reads: every source file it would read (path, size,
    mtime, group, license, language), every archive and table slice (path, size, mtime, slice),
    every file skipped from its path or size, and the extra decontamination sets. It changes
    when a code file is added, removed, edited or relicensed; files that are not code (README,
    data) are not in it. Hashed as it goes: no list beyond the enumeration's own is built."""
    h = hashlib.sha256()

    def put(*parts) -> None:
        h.update("\0".join(str(p) for p in parts).encode("utf-8", "surrogatepass") + b"\n")

    for r in refs:
        put("file", r.path, r.size, r.mtime_ns, r.group, r.license, r.lang)
    last = stat = None
    for t in enum.tasks:
        if t.path != last:              # a table's slices share one stat
            last, stat = t.path, _stat_key(t.path)
        put("task", t.kind, t.source, stat, t.part, t.start, t.end)
    for s in enum.skips:
        put("skip", s.reason, s.where, s.size)
    for p in cfg.decontam_extra:
        put("decontam", _stat_key(p))
    return h.hexdigest()[:16]


def corpus_id(manifest: dict) -> str:
    """What a tokenizer or token shards made from a corpus record and are checked against: the
    digest of its contents, so that a rebuild over changed sources is never taken for the corpus
    they were made from. A manifest from before content digests falls back to its fingerprint."""
    return manifest.get("content_digest") or manifest["fingerprint"]


def _sampler(refs, tasks, max_bytes: int, seed: int):
    """A deterministic Bernoulli sample of files/tasks holding about max_bytes (None: keep all).

    Each unit is kept when a seeded hash of its name falls below max_bytes / total, so a capped
    build is spread evenly over all packages instead of taking the alphabetically first ones.
    """
    total = sum(r.size for r in refs) + sum(t.est_bytes for t in tasks)
    if total <= max_bytes:
        return None
    threshold = int(max_bytes / total * 2**64)

    def keep(key: str) -> bool:
        h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(h, "little") < threshold

    return keep


def _choose_val(bucket_bytes: dict[int, int], fraction: float, seed: int) -> set[int]:
    """Whole buckets (so whole groups) go to val until it holds ~fraction of the bytes."""
    if fraction <= 0 or len(bucket_bytes) < 2:
        return set()
    total = sum(bucket_bytes.values())
    target = fraction * total
    order = sorted(bucket_bytes, key=lambda b: hashlib.blake2b(f"{seed}\0split\0{b}".encode(), digest_size=8).digest())
    val, vb = set(), 0
    for b in order:
        if vb >= target:
            break
        if vb + bucket_bytes[b] <= 1.5 * target:
            val.add(b)
            vb += bucket_bytes[b]
    if not val:  # every bucket is bigger than the target: take the smallest one
        val.add(min(order, key=lambda b: bucket_bytes[b]))
    return val


class _Merger:
    """The main process' side of a build: merges worker results in task order, deduplicates, and
    appends kept documents to one staging file per bucket, hashing each file as it is written."""

    def __init__(self, cfg: BuildConfig, staging: Path):
        self.total = _Result()
        self.staging = staging
        self.handles: dict[int, object] = {}
        self.hashes: dict[int, object] = {}        # bucket -> sha256 of its file so far
        self.bucket_bytes: Counter = Counter()
        self.group_stats: dict[str, list] = defaultdict(lambda: [0, 0, 0])   # files, bytes, bucket
        self.lang_stats: dict[str, list] = defaultdict(lambda: [0, 0])
        self.lic_stats: dict[str, list] = defaultdict(lambda: [0, 0])
        self.exact: set[bytes] = set()
        self.near = dedup.NearDupIndex(cfg.near_dup_threshold) if cfg.near_dedup else None
        self.kept = 0
        self.warned = 0

    def add(self, res: _Result) -> None:
        total = self.total
        total.files_seen += res.files_seen
        total.bytes_read += res.bytes_read
        total.not_code += res.not_code
        total.redactions.update(res.redactions)
        total.contaminated_by.update(res.contaminated_by)
        for reason, (n, b, ex) in res.drops.items():
            d = total.drops.setdefault(reason, [0, 0, []])
            d[0] += n
            d[1] += b
            d[2].extend(ex[: _EXAMPLES - len(d[2])])
            if reason == "unreadable" and self.warned < 20:
                for e in ex:
                    print(printable(f"warning: skipped unreadable input {e}"), file=sys.stderr)
                    self.warned += 1
        for doc in res.docs:
            self._add_doc(doc)

    def _add_doc(self, doc: _Doc) -> None:
        if doc.digest in self.exact:
            self.total.drop("exact_duplicate", doc.nbytes, doc.where)
            return
        self.exact.add(doc.digest)
        if self.near is not None and doc.sig is not None and self.near.add(self.kept, doc.sig) is not None:
            self.total.drop("near_duplicate", doc.nbytes, doc.where)
            return
        f = self.handles.get(doc.bucket)
        if f is None:
            f = self.handles[doc.bucket] = open(self.staging / f"part-{doc.bucket:05d}.jsonl", "wb", buffering=1 << 20)
            self.hashes[doc.bucket] = hashlib.sha256()
        f.write(doc.line)
        self.hashes[doc.bucket].update(doc.line)
        self.kept += 1
        self.bucket_bytes[doc.bucket] += doc.nbytes
        g = self.group_stats[doc.group]
        g[0] += 1
        g[1] += doc.nbytes
        g[2] = doc.bucket
        self.lang_stats[doc.lang][0] += 1
        self.lang_stats[doc.lang][1] += doc.nbytes
        self.lic_stats[doc.license or "unknown"][0] += 1
        self.lic_stats[doc.license or "unknown"][1] += doc.nbytes

    def close(self) -> None:
        for f in self.handles.values():
            f.close()


def build_corpus(out_dir: str | os.PathLike, sources: list[str] | None = None, *, workers: int | None = None,
                 force: bool = False, progress: bool = True, check_inputs: bool = True, **options) -> dict:
    """Build the corpus into `out_dir` and return its manifest (see module docstring).

    `options` are BuildConfig fields (languages, license_policy, max_mb, val_fraction, seed, ...).
    If `out_dir` already holds a finished build with the same settings over the same sources
    (`inputs_digest`: no code file added, removed or changed since) it is reused as is; if the
    sources changed it is rebuilt. `check_inputs=False` reuses a finished build with the same
    settings without looking at the sources (a resumable pipeline's finished stage: the
    speedrun's later stages were made from it).
    """
    cfg = BuildConfig(sources=list(sources or ["default"]), **options)
    if cfg.license_policy not in licenses.POLICIES:
        raise ValueError(f"unknown license policy {cfg.license_policy!r}; choose from {sorted(licenses.POLICIES)}")
    if cfg.languages:
        unknown = sorted(set(cfg.languages) - set(srcs.LANGUAGES))
        if unknown:
            raise ValueError(f"unknown language(s) {unknown}; known: {', '.join(srcs.LANGUAGES)}")
    specs = [srcs.parse_source(s) for s in cfg.sources]
    out = Path(out_dir)
    old = _existing_build(out, cfg, force)
    if old is not None and not check_inputs:
        if progress:
            print(f"corpus in {out} is already complete (manifest.json); reusing it", file=sys.stderr)
        return old
    t0 = time.perf_counter()
    limits = srcs.SizeLimits(cfg.min_bytes, cfg.max_bytes)
    refs, enum = srcs.enumerate_sources(specs, limits)
    inputs = inputs_digest(refs, enum, cfg)
    if old is not None:
        if old.get("inputs_digest") in (inputs, None):
            if progress:
                print(f"corpus in {out} is already complete (manifest.json); reusing it", file=sys.stderr)
            if "inputs_digest" not in old:
                print(f"note: {out} was built before source signatures were recorded, so whether its sources "
                      f"changed since is unknown; pass --force to rebuild it", file=sys.stderr)
            return old
        print(f"the sources of the corpus in {out} changed since it was built; rebuilding it", file=sys.stderr)
    _reset_out(out)

    decontaminator = None
    benchmarks = []
    if cfg.decontaminate:
        benchmarks = [clean.humaneval_benchmark()] + [clean.jsonl_benchmark(p) for p in cfg.decontam_extra]
        decontaminator = clean.Decontaminator(benchmarks)
    pre_skips, tasks = enum.skips, enum.tasks
    if cfg.max_mb:
        keep = _sampler(refs, tasks, int(cfg.max_mb * 1e6), cfg.seed)
        if keep is not None:
            refs = [r for r in refs if keep(r.path)]
            tasks = [t for t in tasks if keep(f"{t.path}\0{t.part}\0{t.start}")]
            pre_skips = [s for s in pre_skips if keep(s.where)]
    tasks = srcs.batch_files(refs) + tasks
    t_enum = time.perf_counter() - t0

    staging = out / ".staging"
    staging.mkdir()
    merge = _Merger(cfg, staging)
    for s in pre_skips:
        merge.total.files_seen += 1
        merge.total.drop(s.reason, s.size, s.where, s.message)
        if s.reason == "unreadable":
            print(printable(f"warning: skipped unreadable input {s.where}: {s.message}"), file=sys.stderr)
    merge.total.not_code = enum.not_code
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    _run_tasks(tasks, cfg, decontaminator, workers, merge, progress)
    t_process = time.perf_counter() - t0 - t_enum

    val_buckets = _choose_val(dict(merge.bucket_bytes), cfg.val_fraction, cfg.seed)
    files, content_digest = _write_splits(out, merge, val_buckets)
    split_stats = _write_groups(out, merge, val_buckets)
    elapsed = time.perf_counter() - t0
    timing = {"enumerate_s": round(t_enum, 3), "process_s": round(t_process, 3), "total_s": round(elapsed, 3),
              "workers": workers, "mb_per_s": round(merge.total.bytes_read / 1e6 / max(elapsed, 1e-9), 2)}
    digests = {"inputs_digest": inputs, "content_digest": content_digest}
    manifest = _manifest(cfg, specs, digests, merge, decontaminator, benchmarks, val_buckets, split_stats, files,
                         timing)
    (out / "summary.md").write_text(summary_markdown(manifest), encoding="utf-8")
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / "manifest.json")
    (out / _BUILDING).unlink()
    return manifest


def _run_tasks(tasks: list[srcs.Task], cfg: BuildConfig, decontaminator, workers: int, merge: _Merger,
               progress: bool) -> None:
    """Read and clean every task (in worker processes when workers > 1), merging the results in
    task order, until --max-mb bytes have been read."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.est_bytes for t in tasks), unit="B", unit_scale=True, desc="data build",
                   file=sys.stderr, smoothing=0.1)
    cap = int(cfg.max_mb * 1e6) if cfg.max_mb else None

    def results():
        if workers == 1 or len(tasks) <= 1:
            _init_worker(cfg, decontaminator)
            for t in tasks:
                yield t, _process_task(t)
        else:
            with mp_context().Pool(workers, initializer=_init_worker, initargs=(cfg, decontaminator)) as pool:
                yield from zip(tasks, pool.imap(_process_task, tasks, chunksize=1))

    try:
        for task, res in results():
            if bar is not None:
                bar.update(task.est_bytes)
            merge.add(res)
            if cap is not None and merge.total.bytes_read >= cap:
                break
    finally:
        merge.close()
        if bar is not None:
            bar.close()


def _write_splits(out: Path, merge: _Merger, val_buckets: set[int]) -> tuple[dict[str, list[str]], str]:
    """Move the bucket files into train/ and val/; return the file lists and the corpus' content
    digest: sha256 over each file's name and sha256 (hashed while written: nothing is read back)."""
    files: dict[str, list[str]] = {"train": [], "val": []}
    for split in files:
        (out / split).mkdir()
    listing = hashlib.sha256()
    for b in sorted(merge.bucket_bytes):
        split = "val" if b in val_buckets else "train"
        name = f"{split}/part-{b:05d}.jsonl"
        os.replace(merge.staging / f"part-{b:05d}.jsonl", out / name)
        files[split].append(name)
        listing.update(f"{name}\t{merge.hashes[b].hexdigest()}\n".encode())
    shutil.rmtree(merge.staging)
    return files, listing.hexdigest()


def _write_groups(out: Path, merge: _Merger, val_buckets: set[int]) -> dict[str, dict]:
    """groups.tsv, and files / bytes / groups per split."""
    split_stats = {s: {"files": 0, "bytes": 0, "groups": 0} for s in ("train", "val")}
    with open(out / "groups.tsv", "w", encoding="utf-8") as f:
        f.write("group\tsplit\tfiles\tbytes\n")
        for gname in sorted(merge.group_stats):
            n, b, bucket = merge.group_stats[gname]
            split = "val" if bucket in val_buckets else "train"
            f.write(f"{tsv_field(gname)}\t{split}\t{n}\t{b}\n")
            st = split_stats[split]
            st["files"] += n
            st["bytes"] += b
            st["groups"] += 1
    return split_stats


def _manifest(cfg: BuildConfig, specs, digests: dict, merge: _Merger, decontaminator, benchmarks,
              val_buckets: set[int], split_stats: dict, files: dict, timing: dict) -> dict:
    total, near = merge.total, merge.near
    return {
        "format": "nanoseek-corpus",
        "version": PIPELINE_VERSION,
        "fingerprint": cfg.fingerprint(),   # the settings; inputs_digest / content_digest: what was read / written
        **digests,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": asdict(cfg),
        "sources": [s.label for s in specs],
        "python": sys.version.split()[0],
        "counts": {
            "files_seen": total.files_seen,
            "bytes_read": total.bytes_read,
            "not_code_ignored": total.not_code,
            "kept_files": merge.kept,
            "kept_bytes": sum(merge.bucket_bytes.values()),
            "dropped_files": sum(v[0] for v in total.drops.values()),
        },
        "dropped": {k: {"files": v[0], "bytes": v[1], "examples": v[2]} for k, v in sorted(total.drops.items())},
        "redactions": dict(sorted(total.redactions.items())),
        "languages": {k: {"files": v[0], "bytes": v[1]} for k, v in sorted(merge.lang_stats.items())},
        "licenses": {k: {"files": v[0], "bytes": v[1]}
                     for k, v in sorted(merge.lic_stats.items(), key=lambda kv: -kv[1][1])},
        "license_policy": {"policy": cfg.license_policy, "allowed_categories": list(licenses.POLICIES[cfg.license_policy])},
        "dedup": {
            "exact": "blake2b-128 of the cleaned text",
            "near": None if near is None else {
                "method": "one-permutation MinHash (rotation densification) + datasketch.MinHashLSH, verified",
                "shingle_tokens": dedup.SHINGLE, "num_perm": dedup.NUM_PERM, "bands": near.bands, "rows": near.rows,
                "jaccard_threshold": cfg.near_dup_threshold},
        },
        "decontamination": {
            "ngram_tokens": clean.DECONTAM_NGRAM if decontaminator else None,
            "benchmarks": [{"name": b.name, "source": b.source} for b in benchmarks],
            "ngrams": decontaminator.ngram_count() if decontaminator else 0,
            "dropped_by_benchmark": dict(total.contaminated_by),
        },
        "split": {"by": "group (repository / package)", "seed": cfg.seed, "val_fraction": cfg.val_fraction,
                  "num_buckets": cfg.num_buckets, "val_buckets": sorted(val_buckets), **split_stats},
        "files": files,
        "timing": timing,
    }


def _mb(b: int) -> str:
    return f"{b / 1e6:,.2f} MB"


def summary_markdown(m: dict) -> str:
    c = m["counts"]
    lines = [
        f"# Corpus summary ({m['created']})", "",
        f"Sources: {', '.join(m['sources'])}  ",
        f"Read {c['files_seen']:,} source files ({_mb(c['bytes_read'])}) in {m['timing']['total_s']:.1f} s "
        f"({m['timing']['mb_per_s']} MB/s, {m['timing']['workers']} workers); "
        f"ignored {c['not_code_ignored']:,} files that are not source code.  ",
        f"**Kept {c['kept_files']:,} files ({_mb(c['kept_bytes'])})**: "
        f"train {m['split']['train']['files']:,} files / {m['split']['train']['groups']:,} groups "
        f"({_mb(m['split']['train']['bytes'])}), val {m['split']['val']['files']:,} files / "
        f"{m['split']['val']['groups']:,} groups ({_mb(m['split']['val']['bytes'])}); split by group, seed "
        f"{m['split']['seed']}.", "",
        "## Dropped", "", "| reason | files | bytes | example |", "|---|---:|---:|---|",
    ]
    for k, v in m["dropped"].items():
        ex = v["examples"][0] if v["examples"] else ""
        lines.append(f"| {k} | {v['files']:,} | {_mb(v['bytes'])} | {ex[:120].replace('|', '/')} |")
    lines += ["", "## Redactions (typed placeholders)", ""]
    lines += [f"- `<{k}>`: {v:,}" for k, v in m["redactions"].items()] or ["- none"]
    d = m["decontamination"]
    lines += ["", "## Decontamination", ""]
    if d["benchmarks"]:
        lines += [f"- {b['name']}: {b['source']}" for b in d["benchmarks"]]
        lines += [f"- {d['ngrams']:,} distinct {d['ngram_tokens']}-token n-grams; documents dropped: "
                  f"{sum(d['dropped_by_benchmark'].values())}"]
    else:
        lines += ["- disabled"]
    lines += ["", "## Languages (kept)", "", "| language | files | bytes |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['files']:,} | {_mb(v['bytes'])} |" for k, v in m["languages"].items()]
    lines += ["", f"## Licenses (kept; policy: {m['license_policy']['policy']})", "", "| license | files | bytes |",
              "|---|---:|---:|"]
    lines += [f"| {k} | {v['files']:,} | {_mb(v['bytes'])} |" for k, v in list(m["licenses"].items())[:40]]
    if m["dedup"]["near"]:
        n = m["dedup"]["near"]
        lines += ["", "## Deduplication", "",
                  f"Exact: {m['dedup']['exact']}. Near: {n['method']}, {n['shingle_tokens']}-token shingles, "
                  f"{n['num_perm']} bins, {n['bands']} bands x {n['rows']} rows, Jaccard >= {n['jaccard_threshold']}."]
    return "\n".join(lines) + "\n"


def load_manifest(corpus_dir: str | os.PathLike) -> dict:
    """The manifest of a finished corpus, or a clear error if there is none."""
    p = Path(corpus_dir) / "manifest.json"
    if not p.is_file() or (Path(corpus_dir) / _BUILDING).exists():
        raise FileNotFoundError(f"{corpus_dir} is not a finished corpus (no manifest.json); run `nanoseek data build`")
    return json.loads(p.read_text(encoding="utf-8"))


def iter_documents(corpus_dir: str | os.PathLike, split: str = "train"):
    """Yield the records of one split of a corpus, in file order."""
    m = load_manifest(corpus_dir)
    for name in m["files"][split]:
        yield from read_jsonl(Path(corpus_dir) / name)
