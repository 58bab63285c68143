"""report.html and compare.html on hand-written run directories: escaping, embedded PNGs, and a real
browser decoding every image (headless Chromium, when installed)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cptlab.report import write_compare, write_report

EVIL = "<script>alert(1)</script> \x1b[31mred\x1b[0m"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def make_run(root: Path, *, name: str = "toy", seed: int = 0, lr: float = 1e-3, steps: int = 8,
             domains=("arithmetic", "sorting", "arithmetic_ood"), methods=("grpo", "sdpo"),
             drift: bool = True, fault: bool = False, summary: dict | None = None) -> Path:
    """A plausible run directory written by hand: evals every 2 steps, drift per stage, samples."""
    root.mkdir(parents=True)
    trained = [d for d in domains if not d.endswith("_ood")]
    plan = [{"domain": trained[i % len(trained)], "steps": steps, "method": m} for i, m in enumerate(methods)]
    config = {"run": {"name": name, "seed": seed, "out_dir": "runs"}, "method": {"lr": lr},
              "stages": [{"domain": p["domain"], "steps": steps, "method": {"name": p["method"]}} for p in plan]}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    acc = {d: 0.2 + 0.05 * k + 0.02 * seed for k, d in enumerate(domains)}
    records = [{"event": "run_start", "name": name, "base": {"source": "built", "parameters": 80768},
                "domains": list(domains), "stages": plan}]

    def evaluate(stage, stage_name, step, gstep, final):
        records.extend({"event": "eval", "stage": stage, "stage_name": stage_name, "step": step, "global_step": gstep,
                        "final": final, "domain": d, "greedy_acc": round(acc[d], 4), "sampled_acc": acc[d] / 2,
                        "format_rate": 0.9, "mean_length": 12.0} for d in domains)
        samples = {d: [{"question": f"{d} question {i} <b>bold</b>",
                        "completion": EVIL if i == 0 else " <answer>4</answer>", "correct": i == 1,
                        "well_formed": i == 1} for i in range(3)] for d in domains}
        (root / "samples").mkdir(exist_ok=True)
        (root / "samples" / f"stage{stage}-step{step}.json").write_text(json.dumps(samples))

    evaluate(0, "base", 0, 0, True)
    gstep = 0
    for s, p in enumerate(plan, start=1):
        for step in range(1, steps + 1):
            gstep += 1
            acc[p["domain"]] = min(1.0, acc[p["domain"]] + 0.04)
            for d in domains:
                if d != p["domain"] and not d.startswith(p["domain"]):
                    acc[d] = max(0.0, acc[d] - 0.015)
            rec = {"event": "train", "stage": s, "domain": p["domain"], "method": p["method"], "step": step,
                   "global_step": gstep, "reward": acc[p["domain"]], "accuracy": acc[p["domain"]],
                   "entropy": 2.5 - 0.05 * gstep, "kl_to_base": 0.01 * gstep, "response_length": 10 + math.sin(gstep),
                   "loss": 0.1, "grad_norm": 1.0}
            if p["method"] == "sdpo":
                rec.update({"sdpo/divergence": 0.01, "sdpo/top1_agreement": 0.9, "teacher/with_demo_frac": 0.5})
            records.append(rec)
            if fault and s == len(plan) and step == steps // 2:
                records.append({"event": "fault", "stage": s, "global_step": gstep, "reason": "loss is NaN <x>",
                                "action": "stopped"})
                break
            if step % 2 == 0 or step == steps:
                evaluate(s, p["domain"], step, gstep, step == steps)
        else:
            records.append({"event": "stage_end", "stage": s, "domain": p["domain"], "method": p["method"],
                            "steps": steps, "global_step": gstep})
            if drift:
                records.append({"event": "drift", "stage": s, "global_step": gstep, "param/rel_l2_base": 0.01 * s,
                                "param/rel_l2_base/attention": 0.02 * s, "param/rel_l2_base/mlp": 0.015 * s,
                                "param/sparsity": 0.5, "param/num_tensors": 12.0, "response/kl_to_base": 0.1 * s,
                                "response/answer_changed_frac": 0.2 * s, "artifacts/repetition_rate": 0.05 * s,
                                "artifacts/malformed_rate": 0.1 / s, "artifacts/char_level": 1.0})
            continue
        break
    if not fault:
        records.append({"event": "run_end", "seconds": 12.0, "global_step": gstep})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def images(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in IMG_RE.findall(text)]


def test_report_is_self_contained_escaped_and_has_valid_pngs(tmp_path):
    run = make_run(tmp_path / "run", summary={"name": "toy", "headline": ["Stage 1: GRPO gained <9> points"]})
    path = write_report(run)
    assert path == run / "report.html" and path.is_file()
    text = path.read_text()
    assert "<script" not in text.lower()  # no page script at all, and the model's one is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\x1b" not in text and "\\x1b[31m" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "Stage 1: GRPO gained &lt;9&gt; points" in text  # summary.json's headline, escaped
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from outside
    pngs = images(text)
    # matrix, accuracy over steps, training curves, SDPO curves, param drift, response drift, artifacts
    assert len(pngs) == 7
    assert text.count('<img src="data:image/png;base64,') == 7
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(png)).verify()  # the whole file decodes, not just its header
    # BWT: arithmetic 52% right after stage 1, 40% after stage 2 (8 steps of -1.5 points)
    assert '<span class="neg">-12.0</span>' in text


def test_report_of_a_faulted_run_without_summary_json(tmp_path):
    from cptlab.analysis.summary import build_summary
    from cptlab.store import read_jsonl

    run = make_run(tmp_path / "run", drift=False, fault=True, methods=("grpo", "sft", "sdpo"))
    text = write_report(run).read_text()
    for line in build_summary(read_jsonl(run / "metrics.jsonl")).get("headline") or []:
        assert html.escape(line) in text  # no summary.json on disk: the headline is built from the records
    assert "Fault in stage 3" in text and "loss is NaN &lt;x&gt;" in text
    assert "has not finished" in text
    assert len(images(text)) == 4  # matrix, accuracy over steps, training curves, SDPO curves


def test_headline_fallback_names_gain_and_largest_drop(tmp_path, monkeypatch):
    import cptlab.analysis.summary as summary_module

    monkeypatch.setattr(summary_module, "build_summary", lambda records: {})  # as with an older cptlab
    run = make_run(tmp_path / "run", steps=4, drift=False)
    text = write_report(run).read_text()
    # each step: +4 points on the trained domain, -1.5 on the others (arithmetic_ood spared by arithmetic)
    assert "GRPO on arithmetic: +16.0 points in-domain, largest drop −6.0 on sorting." in text
    assert "SDPO on sorting: +16.0 points in-domain, largest drop −6.0 on arithmetic" in text


def test_compare_names_both_runs_and_groups_seeds(tmp_path):
    a = make_run(tmp_path / "a", name="grpo-s0", seed=0)
    b = make_run(tmp_path / "b", name="grpo-s1", seed=1)
    c = make_run(tmp_path / "c", name="other", lr=5e-4, methods=("sft",))
    out = write_compare([a, b, c], tmp_path / "cmp.html")
    text = out.read_text()
    assert "grpo-s0 (GRPO→SDPO)" in text and "grpo-s1 (GRPO→SDPO)" in text and "other (SFT)" in text
    assert "grpo (GRPO→SDPO), 2 seeds" in text  # a and b differ only in seed and name
    assert "other (SFT), " not in text
    assert "<script" not in text.lower()
    # matrices, final bars, bars over seeds, bands over seeds, average accuracy per stage, drift
    pngs = images(text)
    assert len(pngs) == 6 and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert "Drift and artifacts after each stage" in text
    no_drift = [make_run(tmp_path / d, name=d, drift=False) for d in ("x", "y")]
    assert "Drift and artifacts" not in write_compare(no_drift, tmp_path / "nd.html").read_text()


def test_missing_run_dir_is_a_user_error(tmp_path):
    from cptlab.errors import UserError

    with pytest.raises(UserError, match="metrics.jsonl"):
        write_report(tmp_path / "nope")


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run must install Debian's chromium "
                        "(apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return exe


def _chrome(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=60)


def test_chromium_decodes_every_image_and_renders(tmp_path):
    exe = _chromium()
    text = write_report(make_run(tmp_path / "run")).read_text()
    tags = re.findall(r'<img src="data:image/png;base64,[^"]+"[^>]*>', text)
    assert tags
    # The report has no JavaScript, so the check runs in a wrapper page holding copies of its <img> tags.
    checker = tmp_path / "check.html"
    checker.write_text("<!DOCTYPE html><html><body>" + "".join(tags) + """<p id="out">PENDING</p><script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.getElementById("out").textContent = `IMAGES_OK ${ok}/${imgs.length}`;
});</script></body></html>""")
    dom = _chrome(exe, tmp_path / "profile", "--virtual-time-budget=5000", "--dump-dom", checker.as_uri())
    assert f"IMAGES_OK {len(tags)}/{len(tags)}" in dom.stdout, dom.stdout[-500:] + dom.stderr[-2000:]
    shot = tmp_path / "shot.png"
    _chrome(exe, tmp_path / "profile2", "--window-size=1200,2000", f"--screenshot={shot}",
            (tmp_path / "run" / "report.html").as_uri())
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000
