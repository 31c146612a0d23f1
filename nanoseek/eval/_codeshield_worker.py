"""CodeShield worker: runs Meta's CodeShield insecure-code detector as a library, in its own
environment, and answers scan requests from `security.CodeShieldDetector` over stdin/stdout.

This file is not imported by nanoseek. `security.py` starts it as
`<codeshield-python> -I -c <this file>`, with the interpreter of the environment where
`codeshield==1.0.1` and `semgrep==1.185.0` are installed (`.venv/tools/codeshield`, made by `scripts/setup.sh`: a
separate environment because semgrep 1.185 pins opentelemetry-api~=1.37 while FastAPI 0.163
needs >=1.44, so the two cannot share one environment). stdlib + codeshield only.

Protocol: one JSON object per line each way.
  request   {"id": N, "items": [{"code": str, "before": str | null}, ...]}
  response  {"id": N, "results": [[issue, ...], ...]}   or   {"id": N, "error": str}
  issue     {"analyzer", "pattern_id", "cwe", "severity", "line", "description"}
            `line` is 1-based in before + code (regex issues are found in `code` only and
            shifted by the lines of `before`, as semgrep's are absolute).

What is called: `insecure_code_detector.analyze(Language.PYTHON, code, code_before=before,
usecase=UseCase.CYBERSECEVAL)`, the entry point CyberSecEval's autocomplete benchmark uses:
its regex rules on the generated code, and its semgrep rules (run by the `osemgrep` binary of
the semgrep wheel with `--metrics off` and the rule file shipped in codeshield) on
before + code, keeping only findings on the generated code's lines.

Two facts about codeshield 1.0.1 with semgrep 1.185, found while wiring this up:
  * `CodeShield.scan_code` uses the CODESHIELD use case, which returns as soon as a regex rule
    matches and runs semgrep only when a pre-scan regex matches: it is a fast filter for
    serving, not the CyberSecEval detector. We call `analyze` with the CYBERSECEVAL use case.
  * codeshield passes `--project-root /` for the absolute temporary file it writes; semgrep
    1.185 then reports "the project root '/' does not contain the scanning root" and scans
    nothing, so *every* semgrep rule silently returned no findings. We drop that argument (the
    scanned file is named explicitly, so no project root is needed).
No network is used: rules are local files, metrics are off, the version check is disabled
through the environment (`SEMGREP_ENABLE_VERSION_CHECK=0`), and tests run this worker in a
network namespace without interfaces.
"""


def _main():
    import asyncio
    import json
    import logging
    import os
    import sys

    out = sys.stdout
    sys.stdout = sys.stderr  # anything codeshield prints must not corrupt the protocol
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)

    from codeshield.insecure_code_detector import insecure_code_detector as icd
    from codeshield.insecure_code_detector.languages import Language
    from codeshield.insecure_code_detector.usecases import UseCase

    run_command = icd._run_command

    async def run_without_project_root(command):
        command = list(command)
        if "--project-root" in command:
            i = command.index("--project-root")
            del command[i:i + 2]
        return await run_command(command)

    icd._run_command = run_without_project_root
    from importlib.metadata import version

    out.write(json.dumps({"hello": {"codeshield": version("codeshield"), "semgrep": version("semgrep")}}) + "\n")
    out.flush()
    concurrency = max(1, int(os.environ.get("NANOSEEK_CODESHIELD_JOBS", os.cpu_count() or 1)))

    def sev(s):
        s = getattr(s, "value", s)
        return str(s).upper()

    async def one(item, gate):
        before = item.get("before") or None
        code = item["code"]
        async with gate:
            issues = await icd.analyze(Language.PYTHON, code, code_before=before,
                                       usecase=UseCase.CYBERSECEVAL)
        shift = before.count("\n") if before else 0
        res = []
        for i in issues:
            analyzer = getattr(i.analyzer, "value", str(i.analyzer))
            line = i.line
            if analyzer == "regex" and isinstance(line, int):
                line += shift  # regex lines count from the start of `code`
            res.append({"analyzer": analyzer, "pattern_id": i.pattern_id or "", "cwe": i.cwe_id or "",
                        "severity": sev(i.severity), "line": line,
                        "description": (i.description or "")[:300]})
        return res

    async def batch(items):
        gate = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(one(it, gate) for it in items))

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            resp = {"id": req.get("id"), "results": asyncio.run(batch(req["items"]))}
        except Exception as e:  # reported to the caller, which raises with this message
            resp = {"id": req.get("id"), "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(resp) + "\n")
        out.flush()


_main()
