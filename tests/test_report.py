"""report.html and compare.html on hand-written run directories: escaping, embedded PNGs, and a real
browser decoding every image (headless Chromium, when installed)."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cptlab.compare_page import write_compare
from cptlab.report import write_report
from helpers import PNG_MAGIC, images, make_run


def test_report_is_self_contained_escaped_and_has_valid_pngs(tmp_path):
    run = make_run(tmp_path / "run", name="toy <9>", summary={"name": "stale", "mean_forgetting": 0.99})
    path = write_report(run)
    assert path == run / "report.html" and path.is_file()
    text = path.read_text()
    assert "<script" not in text.lower()  # no page script at all, and the model's one is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "\x1b" not in text and "\\x1b[31m" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "<h1>toy &lt;9&gt;</h1>" in text  # the run's name, from the records, escaped
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from outside
    pngs = images(text)
    # first page: matrix, gain and cost, drift and artifacts; folded: accuracy over steps, training curves,
    # param drift, response drift, artifacts (the SDPO records are constant: listed, not drawn)
    assert len(pngs) == 8
    assert text.count(' src="data:image/png;base64,') == 8
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(png)).verify()  # the whole file decodes, not just its header
    # BWT from the records, never summary.json's stale numbers: arithmetic 52% right after stage 1, 40% after
    # stage 2 (8 steps of -1.5 points)
    assert '<span class="neg">-12.0</span>' in text and "+99.0" not in text
    # the constant series (param/sparsity is 0.5 at every stage) is named, not drawn
    assert "Constant over the run, not drawn: weights left (nearly) unchanged = 50%." in text
    assert ("Constant over the run, not drawn: distillation loss = 0.01; teacher and student agree = 90%; "
            "reprompts with a demonstration = 50%.") in text
    assert "sparsity" not in text.replace("param/sparsity", "")  # no raw metric name as a title


def test_headline_says_what_changed_and_how_sure(tmp_path):
    """200 prompts per domain; each step +8 hits on the trained domain and -3 on the others."""
    run = make_run(tmp_path / "run", steps=4)
    text = write_report(run).read_text()
    head = text[text.index('id="headline"'):text.index("</div>", text.index('id="headline"'))]
    # stage 1: arithmetic 40 -> 72 hits of 200; the newly right prompts are right after and wrong before, so
    # every paired difference is 0 or +1 and the whole interval lies above zero
    assert "<b>Stage 1 · GRPO on arithmetic</b>: arithmetic 20% → 36%, <span class=\"pos\">+16.0 points</span>" in head
    # sorting 50 -> 38 hits (-6.0) and arithmetic_ood unchanged (0.0): -3.0 on average, beyond noise
    assert "the 2 other domains <span class=\"neg\">-3.0 points</span>" in head
    assert "(most: sorting -6.0)" in head
    # stage 2 costs arithmetic, trained before: 72 -> 60 hits
    assert "earlier-trained arithmetic <span class=\"neg\">-6.0 points</span>" in head
    assert "<b>After 2 stages</b>" in head and "since their own stage arithmetic" in head
    assert "weights moved 2% from the base" in head
    # an unchanged domain is within noise: make sorting's stage-2 records equal to its stage-1 ones
    for f in (run / "evals").glob("stage2-*.json"):
        rec = json.loads(f.read_text())
        rec["domains"]["arithmetic"] = json.loads((run / "evals" / "stage1-step4.json").read_text())["domains"][
            "arithmetic"]
        f.write_text(json.dumps(rec))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    fixed = [json.loads(l) for l in lines]
    for r in fixed:
        if r.get("event") == "eval" and r["stage"] == 2 and r["domain"] == "arithmetic":
            r["greedy_acc"] = 72 / 200
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fixed))
    text = write_report(run).read_text()
    assert "earlier-trained arithmetic +0.0 points <span class=\"muted\">(within noise, 95%: +0.0 to +0.0)" in text


def test_report_of_a_faulted_run_without_summary_json(tmp_path):
    run = make_run(tmp_path / "run", drift=False, fault=True, methods=("grpo", "sft", "sdpo"))
    text = write_report(run).read_text()
    assert "<b>Stage 2 · SFT on sorting</b>" in text and "Stage 3 ·" not in text  # stage 3 never finished
    assert "Fault in stage 3" in text and "loss is NaN &lt;x&gt;" in text
    assert "has not finished" in text
    # matrix, gain and cost, accuracy over steps, training curves (no drift records: no drift figures; the
    # SDPO records are constant: listed, not drawn)
    assert len(images(text)) == 4


def test_compare_names_both_runs_and_groups_seeds(tmp_path):
    a = make_run(tmp_path / "a", name="grpo-s0", seed=0)
    b = make_run(tmp_path / "b", name="grpo-s1", seed=1)
    c = make_run(tmp_path / "c", name="other", lr=5e-4, methods=("sft",))
    out = write_compare([a, b, c], tmp_path / "cmp.html")
    text = out.read_text()
    # one label per run, the same in every table: the variant, and its seed where it has several
    assert text.count("grpo · seed 0") >= 2 and text.count("grpo · seed 1") >= 2 and "grpo-s0" not in text
    assert "<b>grpo (2 seeds)</b>" in text  # a and b differ only in seed and name: one variant
    assert "other (1 seeds)" not in text and "(GRPO→SDPO)" not in text
    assert re.search(r"<td>grpo</td><td class=\"n\">2</td>", text)  # the statistics table's variant
    assert re.search(r"<td>other</td><td class=\"n\">1</td>", text)
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
    tags = re.findall(r'<img[^>]* src="data:image/png;base64,[^"]+"[^>]*>', text)
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


DOMAINS12 = tuple(d for name in ("arithmetic", "counting", "sorting", "reversal", "filtering", "gcd")
                  for d in (name, f"{name}_ood"))
LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const box = id => { const e = document.getElementById(id); if (!e) return null;
    const r = e.getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, natural: e.naturalWidth || 0}; };
  const out = document.createElement("pre");
  out.textContent = "LAYOUT " + JSON.stringify({viewport: [innerWidth, innerHeight], headline: box("headline"),
                                                matrix: box("matrix")});
  document.body.appendChild(out);
});</script>"""


def test_first_screen_holds_the_headline_and_the_matrix(tmp_path):
    """Every built-in domain (12; the default job evaluates 8) after 3 stages, at 1280x800: the headline card and the whole accuracy
    matrix lie inside the first screen, by the DOM and by the pixels of a screenshot."""
    exe = _chromium()
    run = make_run(tmp_path / "run", domains=DOMAINS12, methods=("grpo", "grpo", "grpo"))
    text = write_report(run).read_text()
    probe = run / "probe.html"  # the report plus a script that writes the layout into the page
    probe.write_text(text.replace("</body>", LAYOUT_PROBE + "</body>"))
    dom = _chrome(exe, tmp_path / "profile", "--window-size=1280,800", "--virtual-time-budget=5000", "--dump-dom",
                  probe.as_uri())
    found = re.search(r"LAYOUT (\{.*\})", html.unescape(dom.stdout))
    assert found, dom.stdout[-500:] + dom.stderr[-2000:]
    layout = json.loads(found[1])
    assert layout["viewport"][0] == 1280  # the width lays the page out; positions are from the page's top
    head, matrix = layout["headline"], layout["matrix"]
    assert 0 <= head["top"] < head["bottom"] <= 800
    assert matrix["natural"] > 0  # decoded
    assert head["bottom"] <= matrix["top"] and matrix["bottom"] <= 800, layout
    assert matrix["right"] - matrix["left"] >= 600 and matrix["bottom"] - matrix["top"] >= 200  # readable size

    shot = tmp_path / "first_screen.png"
    _chrome(exe, tmp_path / "profile2", "--window-size=1280,800", f"--screenshot={shot}",
            (run / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert pixels.shape == (800, 1280, 3)

    def share(box, test) -> float:
        crop = pixels[int(box["top"]):int(box["bottom"]), int(box["left"]):int(box["right"])]
        return float(test(crop[..., 0], crop[..., 1], crop[..., 2]).mean())

    # the heatmap's blue-green cells fill much of the matrix's box; the gains' green text is in the headline
    assert share(matrix, lambda r, g, b: (b > r + 40) & (g > r)) > 0.2
    assert share(head, lambda r, g, b: (g > r + 60) & (g > b + 40)) > 0.001


def test_rate_axes_start_at_zero_and_a_handful_of_answers_stays_near_the_floor():
    """A malformed rate going from 0.13% to 0.39% of answers: drawn on 0..5%, not on an axis it fills;
    a percent ratio (weights moved) from zero, fitted; a plain value keeps matplotlib's own limits."""
    import matplotlib.pyplot as plt

    from cptlab.labels import label
    from cptlab.plots import _axis

    def limits(key: str, ys: list[float]) -> tuple[float, float]:
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], ys)
        _axis(ax, "t", {"t": (label(key).unit, label(key).axis_top)})
        low, high = ax.get_ylim()
        plt.close(fig)
        return round(low, 6), round(high, 6)

    assert limits("artifacts/malformed_rate", [0.13, 0.2, 0.39]) == (0.0, 5.0)
    assert limits("artifacts/malformed_rate", [1.0, 8.0, 10.0]) == (0.0, 11.5)  # 15% headroom above the top
    assert limits("param/rel_l2_base", [0.0, 0.4, 0.8]) == (0.0, 0.92)
    assert limits("response/kl_to_base", [1.0, 1.1, 1.2])[0] > 0.9  # a value: not forced to zero


def test_only_answer_rates_are_annotated_with_answer_counts(monkeypatch):
    """The numbers on the artifact panels are answers k/n: only for the shares of answers, never for the
    token ratios (distinct-n, repetition)."""
    from cptlab import report_details
    from cptlab.analysis.artifacts import ANSWER_RATES, artifact_stats

    assert set(ANSWER_RATES) <= set(artifact_stats(["<answer>1</answer>"]))
    seen = {}
    monkeypatch.setattr(report_details.plots, "stage_grid", lambda panels, labels, **kw: seen.update(kw["notes"]) or b"")
    monkeypatch.setattr(report_details, "img", lambda *a, **k: "")

    class FakeRun:
        plan = [{}]

        def stage_label(self, s):
            return f"stage {s}"

    drift = {"artifacts/malformed_rate": ([0, 1], [0.25, 0.5]), "artifacts/distinct_2": ([0, 1], [0.4, 0.3]),
             "artifacts/repetition_rate": ([0, 1], [0.1, 0.2])}
    report_details.drift_section(FakeRun(), "artifacts", "artifacts", drift, False, None, {0: 8, 1: 8})
    labelled = {report_details.label(k).name: k for k in drift}
    assert seen == {report_details.label("artifacts/malformed_rate").name: ["2/8", "4/8"]}, (seen, labelled)
