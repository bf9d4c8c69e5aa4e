"""`jaxsae report`: the numbers, the files, and an HTML page that a browser renders."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import test_match as tm
from jaxsae import match
from jaxsae import report
from jaxsae import store_writer
from jaxsae.errors import JaxsaeError

PLOTS = ("cosines.png", "frequency.png", "threshold.png", "rules.png", "overlap.png",
         "seeds.png", "stability.png", "importance.png")
CTX = 16


def write_window_store(path, acts, ids_flat, manifest_extra):
  """A store whose rows sit in windows of CTX tokens, so contexts have tokens before them."""
  n, d = acts.shape
  store_writer.init_store(str(path), {"model": "test", "sites": ["site"], "d_in": d,
                                   "dtype": "float32", "ctx_len": CTX, "num_shards": 1,
                                   "excluded_tokens": [], **manifest_extra})
  store_writer.write_shard(str(path), 0, acts[:, None, :], ids_flat.reshape(-1, CTX),
                        np.arange(n))
  store_writer.finalize(str(path))


@pytest.fixture(scope="module")
def matched(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("report")
  rng = np.random.default_rng(0)
  run = tm.make_run(tmp, rng, seeds=3, m=60, store=False)
  ids = rng.integers(0, 5000, 640)
  np.save(tmp / "ids.npy", ids)  # the token of store row r is ids[r]
  write_window_store(tmp / "store", tm.rand(rng, 640, tm.D) * 2, ids, {})
  (run / "run.json").write_text(json.dumps({"store": str(tmp / "store")}))
  match.run(match.MatchConfig(inputs=(str(run),), out=str(tmp / "m"), freq_tokens=640,
                              freq_batch=128))
  return tmp


def test_report_numbers_and_files(matched):
  data = report.run(report.ReportConfig(inputs=(str(matched / "m"),), out=str(matched / "r")))
  for name in PLOTS + ("report.json", "report.html"):
    assert (matched / "r" / name).stat().st_size > 0, name
  saved = json.loads((matched / "r" / "report.json").read_text())
  assert saved["threshold"] == 0.7 and len(saved["plots"]) == len(PLOTS)
  table = pd.read_csv(matched / "m" / match.LATENTS_FILE)
  summary = json.loads((matched / "m" / match.SUMMARY_FILE).read_text())
  # The sweep at the run's own threshold reproduces the match's fractions.
  at = [p for p in data["threshold_sweep"]["agree"] if p["threshold"] == 0.7][0]
  assert at["mean"] == pytest.approx(summary["fraction_shared_mean"])
  # Encoder-only sharing can only exceed both-above, which can only exceed both-agree.
  r = data["rules_compared"]
  assert r["encoder"] >= r["both_above"] >= r["agree"] and r["decoder"] >= r["both_above"]
  assert sum(b["count"] for b in data["frequency_bins"]) == len(table)
  assert data["overlap"]["matrix"][0][1] == pytest.approx(summary["pairs"][0]["fraction_shared"])
  kinds = [e["kind"] for e in data["examples"]]
  assert kinds.count("shared") == 4 and kinds.count("orphan") == 4
  # Orphans shown are the most frequent ones of the base seed.
  first = table[(table.a == "seed0") & (table.b == "seed1")]
  top = first[~first.shared].frequency.max()
  assert data["examples"][4]["frequency"] == pytest.approx(top, rel=1e-5)
  for e in data["examples"]:
    assert 0 < len(e["contexts"]) <= 5
    acts = [c["activation"] for c in e["contexts"]]
    assert acts == sorted(acts, reverse=True)
    c = e["contexts"][0]
    assert c["tokens"][c["index"]] == f"[{c['ids'][c['index']]}]"  # no tokenizer: ids


def test_report_shows_every_latents_stability(matched):
  data = report.run(report.ReportConfig(inputs=(str(matched / "m"),), out=str(matched / "r")))
  stable = pd.read_csv(matched / "m" / match.STABILITY_FILE).set_index(["name", "latent"])
  for e in data["examples"] + data["importance"]["top_orphans"]:
    row = stable.loc[("seed0", e["latent"])]
    assert (e["found_in"], e["group"], e["group_size"]) == (row.found_in, row.group,
                                                              row.group_size)
  counts = data["stability"]["found_in_counts"]
  for name, c in counts.items():
    per = stable.loc[name].found_in
    assert c == {str(k): int((per == k).sum()) for k in range(1, 4)}
  page = (matched / "r" / "report.html").read_text()
  assert f"{data['stability']['num_groups']}</b> distinct features" in page
  assert "found in seeds</th>" in page


def test_contexts_come_from_the_tokens_frequencies_were_measured_on(matched):
  run = matched / "run"
  match.run(match.MatchConfig(inputs=(str(run),), out=str(matched / "m300"), freq_tokens=300,
                              freq_batch=128, contexts=300))
  data = report.run(report.ReportConfig(inputs=(str(matched / "m300"),),
                                        out=str(matched / "r300"), contexts=300))
  ids = np.load(matched / "ids.npy")
  for e in data["examples"]:
    # Every token the latent fired on has a context, so they count its firing frequency.
    assert len(e["contexts"]) == round(e["frequency"] * 300)
    for c in e["contexts"]:
      assert c["ids"][c["index"]] == ids[c["row"]]  # the marked token is the row's own


class _Imgs(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.imgs = []

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.imgs.append(dict(attrs))


def test_html_is_self_contained_and_escaped(matched):
  report.run(report.ReportConfig(inputs=(str(matched / "m"),), out=str(matched / "r2"),
                                 contexts=0))
  text = (matched / "r2" / "report.html").read_text()
  parser = _Imgs()
  parser.feed(text)
  assert len(parser.imgs) == len(PLOTS)
  assert all(i["src"].startswith("data:image/png;base64,") for i in parser.imgs)
  assert "file://" not in text and 'src="http' not in text
  ctx = {"tokens": ["a<b>", " & ", "x"], "index": 1, "activation": 1.0}
  assert report._context_html(ctx).count("&lt;b&gt;") == 1
  assert "<mark> &amp; </mark>" in report._context_html(ctx)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(matched, tmp_path):
  report.run(report.ReportConfig(inputs=(str(matched / "m"),), out=str(matched / "r3")))
  # A copy with a script that records each image's decoded size once the page has loaded.
  page = (matched / "r3" / "report.html").read_text().replace("</body>", """<script>
window.addEventListener("load", () => { for (const i of document.images) {
  i.setAttribute("data-size", i.naturalWidth + "x" + i.naturalHeight); } });
</script></body>""")
  probe = tmp_path / "probe.html"
  probe.write_text(page)
  flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'u'}"]
  dom = subprocess.run(["chromium", *flags, "--dump-dom", f"file://{probe}"],
                       capture_output=True, text=True, timeout=120).stdout
  parser = _Imgs()
  parser.feed(dom)
  assert len(parser.imgs) == len(PLOTS)
  for img in parser.imgs:
    assert img["src"].startswith("data:image/png;base64,")
    w, h = map(int, img["data-size"].split("x"))
    assert w > 300 and h > 200, img["alt"]
  shot = tmp_path / "shot.png"
  subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,4000",
                  f"file://{matched / 'r3' / 'report.html'}"], capture_output=True,
                 timeout=120)
  assert shot.stat().st_size > 50_000  # a page with plots, not a blank one


def test_missing_match_dir(tmp_path):
  with pytest.raises(JaxsaeError, match="run `jaxsae match"):
    report.run(report.ReportConfig(inputs=(str(tmp_path),)))
  with pytest.raises(JaxsaeError, match="exactly one"):
    report.run(report.ReportConfig(inputs=()))


def test_cli(forks, matched, tmp_path):
  out = tmp_path / "cli"
  done = forks.run("report", str(matched / "m"), f"--out={out}", "--contexts=0", timeout=120)
  assert done.returncode == 0, done.stderr
  assert (out / "report.html").exists() and (out / "report.json").exists()
  done = forks.run("report", str(tmp_path / "nope"), timeout=120)
  assert done.returncode == 1 and "jaxsae report: error:" in done.stderr


# ---------------------------------------------------------------------------------------------
# Importance (measured by the match, see test_match.py) and the match directory alone.


def test_report_importance_and_unequal_widths(tmp_path):
  """A 16-latent SAE against a 24-latent one holding its rows: the report says which side a
  fraction is of, draws the importance of both kinds, and renders."""
  rng = np.random.default_rng(12)
  small, wide, perm = tm.rectangular(rng)
  ids = rng.integers(0, 5000, 640)
  write_window_store(tmp_path / "store", tm.rand(rng, 640, tm.D) * 2, ids, {})
  inputs = [tm.write(tmp_path / "small", small), tm.write(tmp_path / "wide", wide)]
  match.run(match.MatchConfig(inputs=tuple(inputs), out=str(tmp_path / "m"),
                              store=str(tmp_path / "store"), freq_tokens=640, freq_batch=128))
  report.run(report.ReportConfig(inputs=(str(tmp_path / "m"),), out=str(tmp_path / "r"),
                                 orphan_min_frequency=0.0))
  for name in PLOTS + ("report.json", "report.html"):
    assert (tmp_path / "r" / name).stat().st_size > 0, name
  saved = json.loads((tmp_path / "r" / "report.json").read_text())
  # The overlap says which side: all of small's latents, 16 of wide's 24.
  names = saved["overlap"]["names"]
  m = np.array(saved["overlap"]["matrix"])
  assert m[names.index("small"), names.index("wide")] == 1.0
  assert m[names.index("wide"), names.index("small")] == pytest.approx(16 / 24)
  imp = saved["importance"]
  assert len(imp["per_sae"]["small"]) == 16 and len(imp["per_sae"]["wide"]) == 24
  # Shared latents are the same rows in both SAEs; TopK is chosen among more in the wider.
  (pair,) = imp["pairs"]
  assert (pair["a"], pair["n_shared"], pair["n_orphan"]) == ("wide", 16, 8)
  assert imp["median_shared"] == pair["median_shared"]
  assert imp["median_orphan"] == pair["median_orphan"]
  top = imp["top_orphans"]
  assert 0 < len(top) <= 4 and all(t["dec_partner"] == -1 for t in top)
  assert [t["importance"] for t in top] == sorted((t["importance"] for t in top), reverse=True)
  orphans = [i for i in range(24) if i not in set(perm)]
  assert max(t["importance"] for t in top) == pytest.approx(
      max(imp["per_sae"]["wide"][i] for i in orphans))
  assert all(len(t["contexts"]) > 0 for t in top)
  text = (tmp_path / "r" / "report.html").read_text()
  assert "fraction of b" in text and "differ in width" in text and "PW-MCC" in text
  assert "most important frequent orphans" in text
  parser = _Imgs()
  parser.feed(text)
  assert len(parser.imgs) == len(PLOTS)


def test_report_renders_from_the_match_dir_alone(matched, tmp_path):
  """With the store and every SAE deleted, the report renders the same page from the match
  directory, and imports no jax."""
  import sys
  m = tmp_path / "m"
  shutil.copytree(matched / "run", tmp_path / "run")
  shutil.copytree(matched / "store", tmp_path / "store")
  (tmp_path / "run" / "run.json").write_text(json.dumps({"store": str(tmp_path / "store")}))
  match.run(match.MatchConfig(inputs=(str(tmp_path / "run"),), out=str(m), freq_tokens=640,
                              freq_batch=128))
  before = report.run(report.ReportConfig(inputs=(str(m),), out=str(tmp_path / "r1")))
  shutil.rmtree(tmp_path / "store")
  shutil.rmtree(tmp_path / "run")
  code = ("import json, sys; from jaxsae import report; "
          "report.run(report.ReportConfig(inputs=(sys.argv[1],), out=sys.argv[2])); "
          "print(json.dumps(sorted(m for m in ('jax', 'flax', 'transformers', 'jaxsae.store') "
          "if m in sys.modules)))")
  done = subprocess.run([sys.executable, "-c", code, str(m), str(tmp_path / "r2")],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.splitlines()[-1]) == []
  after = json.loads((tmp_path / "r2" / "report.json").read_text())
  assert after == json.loads((tmp_path / "r1" / "report.json").read_text())
  assert all(e["contexts"] for e in after["examples"]) and after["importance"]["top_orphans"]
  assert len(before["importance"]["per_sae"]) == 3
  # A match from before stored measurements renders, and says so; a file gone is one error.
  summary = json.loads((m / match.SUMMARY_FILE).read_text())
  old = {k: v for k, v in summary.items() if k not in ("importance_tokens", "scan_tokens")}
  (m / match.SUMMARY_FILE).write_text(json.dumps(old))
  data = report.run(report.ReportConfig(inputs=(str(m),), out=str(tmp_path / "r3")))
  assert "predates" in data["context_note"] and "predates" in data["importance"]["note"]
  assert "contexts" not in data["examples"][0]
  (m / match.SUMMARY_FILE).write_text(json.dumps(summary))
  (m / match.CONTEXTS_FILE).unlink()
  with pytest.raises(JaxsaeError, match="contexts.npz is missing.*rerun `jaxsae match"):
    report.run(report.ReportConfig(inputs=(str(m),), out=str(tmp_path / "r4")))


def test_the_stores_massive_rows_are_told_beside_the_fvu(matched, tmp_path):
  """The outliers a match keeps of its store's site (store.outlier_record, in match.json) are
  rendered beside the FVU: the one-line warning where massive rows dominate, the figures where
  they do not, and a note where the match kept none."""
  from jaxsae import store
  rng = np.random.default_rng(3)
  acts = tm.rand(rng, 640, tm.D)
  acts[::CTX, 0] += 100.0  # every window's first position, SmolLM2's residual stream in miniature
  write_window_store(tmp_path / "store", acts, rng.integers(0, 5000, 640), {})
  m = tmp_path / "m"
  shutil.copytree(matched / "m", m)
  summary = json.loads((m / match.SUMMARY_FILE).read_text())
  massive = store.Store(str(tmp_path / "store")).outlier_record()
  calm = store.Store(str(matched / "store")).outlier_record()
  assert summary["outliers"] == calm  # what `jaxsae match` keeps of its store's site
  summary.pop("outliers")
  for kept, said in ((massive, "--skip_first=1"), (calm, "no massive rows dominate the FVU"),
                     (None, "match.json records no outlier figures")):
    (m / match.SUMMARY_FILE).write_text(json.dumps(
        {**summary, "outliers": kept} if kept else summary))
    data = report.run(report.ReportConfig(inputs=(str(m),), out=str(tmp_path / "r")))
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.index("FVU there") < page.index(said) < page.index("<th>orphans</th>")
    assert data["outliers"] == (kept or {"note": data["outliers"]["note"]})
  assert massive["warning"].startswith("warning: site: ")
  assert "window position 0" in massive["warning"] and calm["warning"] is None
