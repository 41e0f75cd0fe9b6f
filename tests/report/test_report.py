"""`sstoken inspect` (HTML + JSON, checked in a real headless Chromium) and the training plots.

Everything runs on the tiny offline model of :mod:`sstoken.testing`. One short `sstoken train` run (LoRA, 4
steps) is shared by the module: it provides the log history, the selection snapshots recorded by the trainer
and a trained adapter, so that REL is non-zero when the page is made with ``--adapter``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest

from sstoken.cli import main
from sstoken.errors import ReportError
from sstoken.report.inspector import token_pieces
from sstoken.report.page import visible_piece_html
from sstoken.report.plots import write_training_plots
from sstoken.selection import scoring
from sstoken.testing import save_tiny_model, tiny_tokenizer, write_tiny_jsonl
from sstoken.training.snapshots import SnapshotRecorder, snapshot_steps, thin

# Scoped to this module's tests (a module-level filter would silence them for the whole session).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

RHO = 0.6
GAMMA = 0.5
INJECTED_CONTEXT = "<script>window.__pwned=1;document.title='pwned'</script>"
INJECTED_RESPONSE = '<img src=x onerror="window.__pwned=3"><script>window.__pwned=2</script>'
N_SAMPLES = 5


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    save_tiny_model(root / "tiny")
    write_tiny_jsonl(root / "data.jsonl", n_rows=N_SAMPLES - 1)
    with open(root / "data.jsonl", "a", encoding="utf-8") as handle:
        row = {"messages": [{"role": "user", "content": f"Repeat {INJECTED_CONTEXT} please. Café 🙂"},
                            {"role": "assistant", "content": f"{INJECTED_RESPONSE}\nDone."}]}
        handle.write(json.dumps(row) + "\n")
    return root


def _inspect(workdir, name, *extra):
    html_path, json_path = workdir / f"{name}.html", workdir / f"{name}.json"
    rc = main(["inspect", "--model", str(workdir / "tiny"), "--data", str(workdir / "data.jsonl"),
               "--out", str(html_path), "--json", str(json_path), "--samples", str(N_SAMPLES),
               "--rho", str(RHO), "--gamma", str(GAMMA), *extra])
    assert rc == 0
    return html_path, json.loads(json_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def page(workdir):
    """The inspector page of the base tiny model (no adapter: REL is 0) with the ssToken selector."""
    return _inspect(workdir, "base")


@pytest.fixture(scope="module")
def trained_run(workdir):
    """A 4-step LoRA run through `sstoken train`, writing log history, snapshots, plots and the adapter."""
    out = workdir / "run"
    recipe = workdir / "recipe.yaml"
    recipe.write_text(
        f"model: {workdir / 'tiny'}\n"
        f"data: {workdir / 'data.jsonl'}\n"
        "max_seq_length: 256\n"
        "lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, k_proj, v_proj, o_proj]}\n"
        "selection_method: sstoken\nrho: 0.6\ngamma: 0.5\nhistory: base\n"
        f"output_dir: {out}\n"
        "max_steps: 4\nper_device_train_batch_size: 2\nlearning_rate: 0.05\nlogging_steps: 1\n"
        "save_strategy: 'no'\nreport_to: none\nuse_cpu: true\nseed: 0\ndataloader_num_workers: 0\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(recipe)]) == 0
    return out


def _png_pixels(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def _assert_real_png(path, min_width=400, min_height=300):
    pixels = _png_pixels(path)
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (path, pixels.shape)
    rgb = pixels[..., :3]
    assert float(rgb.std()) > 0.01, f"{path} is blank"
    # A real plot draws on a sizeable share of the canvas, not a few stray pixels.
    assert float((rgb.mean(axis=-1) < 0.9).mean()) > 0.01


# ============================================================================================ pure helpers
def test_token_pieces_join_to_the_decoded_text_and_keep_characters_whole():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Café 🙂\tok <b>"},
                                    {"role": "assistant", "content": "Paris.\n"}], tokenize=False)
    ids = tok(text)["input_ids"]

    def decode(part):
        return tok.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces = token_pieces(ids, decode)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == decode(ids) == text
    # The byte-level tokenizer splits é and 🙂 over several tokens: no piece may hold a broken character, the
    # leading-byte tokens hold nothing and the completing token holds the whole character.
    assert not any("\ufffd" in piece for piece in pieces)
    assert "é" in pieces and "🙂" in pieces
    assert pieces[pieces.index("🙂") - 1] == ""


def test_token_pieces_fall_back_to_single_tokens_when_the_decoder_rewrites_text():
    # A decoder that drops a leading space when decoding at the start (as clean-up rules may) must not make
    # pieces disappear or repeat.
    vocab = {0: "a", 1: " b", 2: " c"}

    def decode(part):
        return "".join(vocab[i] for i in part).lstrip()

    assert token_pieces([0, 1, 2], decode) == ["a", " b", " c"]
    assert token_pieces([1, 2], decode) == ["b", " c"]


def test_visible_piece_html_shows_whitespace_and_escapes_markup():
    assert visible_piece_html(" a\tb") == '<span class="ws">·</span>a<span class="ws">⇥</span>b'
    assert visible_piece_html("\n") == '<span class="ws">↵</span><br>'
    assert visible_piece_html("<script>&") == "&lt;script&gt;&amp;"
    assert visible_piece_html("\x00") == '<span class="ws">\u2400</span>'
    assert "…" in visible_piece_html("")


@pytest.mark.parametrize("max_steps, points, expected", [
    (40, 5, [1, 11, 21, 30, 40]),
    (4, 5, [1, 2, 3, 4]),
    (3, 5, [1, 2, 3]),
    (1, 5, [1]),
    (10, 1, [10]),
    (0, 5, []),
])
def test_snapshot_steps_are_evenly_spaced_and_include_first_and_last(max_steps, points, expected):
    assert snapshot_steps(max_steps, points) == expected


def test_thin_keeps_the_limit_and_spreads_over_the_values():
    assert thin(list(range(10)), 20) == list(range(10))
    picked = thin(list(range(100)), 10)
    assert picked == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert thin([1, 2], 0) == []


def test_snapshot_recorder_records_only_chosen_steps_and_caps_values():
    recorder = SnapshotRecorder(max_steps=9, points=3, max_values=5)  # steps 1, 5, 9
    assert not recorder.add(2, [0.1], [0.2], [True])
    assert recorder.add(5, [0.1, 0.2, 0.3], [0.5, 0.6, 0.7], [True, False, True])
    assert recorder.add(5, [1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4], [False, False, True, True])
    assert not recorder.add(5, [9.0], [0.9], [True])  # full
    (snap,) = recorder.snapshots
    assert snap["step"] == 5
    assert len(snap["rel"]) == len(snap["attention_share"]) == len(snap["kept"]) == 5
    # Values stay aligned with their kept flags after thinning the second batch (2 of 4 positions: 0 and 2).
    assert snap["rel"] == [0.1, 0.2, 0.3, 1.0, 3.0]
    assert snap["kept"] == [True, False, True, False, True]
    assert recorder.add(1, None, [0.4], [True])  # a selector without REL records the attention share only
    assert [s["step"] for s in recorder.snapshots] == [1, 5]
    assert recorder.snapshots[0]["rel"] == []


# ============================================================================================ inspect: numbers
def _response(sample):
    return [t for t in sample["tokens"] if t["role"] == "response"]


def test_inspect_json_follows_the_sstoken_rule_without_adapter(page, workdir):
    _, data = page
    assert data["settings"]["method"] == "sstoken" and data["settings"]["rho"] == RHO
    assert len(data["samples"]) == N_SAMPLES
    assert any("REL is 0" in note for note in data["notes"])
    for sample in data["samples"]:
        response = _response(sample)
        assert response, sample["index"]
        kept = [t for t in response if t["kept"]]
        assert len(kept) == sample["summary"]["n_kept"] == scoring.keep_count(len(response), RHO)
        for token in response:
            assert token["rel"] == 0.0 and token["history_nll"] == token["nll"]
            assert 0.0 <= token["attention_share"] <= 1.0
            assert token["score"] == pytest.approx(GAMMA * token["rel_norm"] + (1 - GAMMA) * token["attention_share"],
                                                   abs=1e-6)
        dropped = [t for t in response if not t["kept"]]
        if dropped:  # the kept tokens are the top-scoring ones
            assert min(t["score"] for t in kept) >= max(t["score"] for t in dropped)
        for token in sample["tokens"]:
            if token["role"] == "context":
                assert token["score"] is None and not token["kept"]
        assert sample["summary"]["mean_attention_share"] == pytest.approx(
            sum(t["attention_share"] for t in response) / len(response))


def test_inspect_tokens_render_as_the_tokenizer_decodes_them(page):
    _, data = page
    tok = tiny_tokenizer()
    last = data["samples"][-1]
    ids = [t["id"] for t in last["tokens"]]
    assert "".join(t["text"] for t in last["tokens"]) == tok.decode(ids, skip_special_tokens=False)
    specials = {t["text"] for t in last["tokens"] if t["special"]}
    assert specials == {"<|im_start|>", "<|im_end|>"}


def test_inspect_full_and_random_selectors(workdir):
    _, full = _inspect(workdir, "full", "--method", "full")
    _, rand = _inspect(workdir, "random", "--method", "random", "--seed", "3")
    for f_sample, r_sample in zip(full["samples"], rand["samples"]):
        assert all(t["kept"] for t in _response(f_sample))
        n = len(_response(r_sample))
        assert r_sample["summary"]["n_kept"] == scoring.keep_count(n, RHO)
    assert any("does not rank by score" in note for note in rand["notes"])


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_inspect_shows_each_tokens_loss_weight(workdir, loss_type):
    """The data's weights (row × message), times DFT's p = exp(−NLL) with --loss-type dft, per response token."""
    data = workdir / "weighted.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Where was Ana born?"},
                          {"role": "assistant", "content": "In Lima.", "weight": 0.5},
                          {"role": "user", "content": "And Bo?"},
                          {"role": "assistant", "content": "In Oslo."}], "weight": 2},
            {"prompt": "Where was Cy born? ", "completion": "In Rome."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    html_path, json_path = workdir / f"weights-{loss_type}.html", workdir / f"weights-{loss_type}.json"
    assert main(["inspect", "--model", str(workdir / "tiny"), "--data", str(data), "--out", str(html_path),
                 "--json", str(json_path), "--method", "full", "--loss-type", loss_type]) == 0
    result = json.loads(json_path.read_text(encoding="utf-8"))
    assert result["settings"]["loss_type"] == loss_type
    first, second = (_response(sample) for sample in result["samples"])
    data_weights = []
    seen_end = 0
    for token in first:  # the first turn (weight 0.5 × 2) ends with its <|im_end|>, then the second (1 × 2)
        data_weights.append(1.0 if seen_end == 0 else 2.0)
        seen_end += token["text"] == "<|im_end|>"
    data_weights += [1.0] * len(second)
    for token, weight in zip(first + second, data_weights):
        dft = math.exp(-token["nll"]) if loss_type == "dft" else 1.0
        assert token["weight"] == pytest.approx(weight * dft, rel=1e-5)
    assert result["samples"][0]["summary"]["mean_weight"] == pytest.approx(
        sum(t["weight"] for t in first) / len(first))
    page_html = html_path.read_text(encoding="utf-8")
    assert "<th>mean weight</th>" in page_html and 'data-weight="' in page_html


def test_inspect_with_adapter_measures_rel_against_the_base_model(workdir, trained_run):
    html_path, data = _inspect(workdir, "adapter", "--adapter", str(trained_run), "--method", "rel")
    assert data["settings"]["adapter"] == str(trained_run)
    assert not any("REL is 0" in note for note in data["notes"])
    assert data["settings"]["score_gamma"] == 1.0
    rels = []
    for sample in data["samples"]:
        response = _response(sample)
        for token in response:
            assert token["rel"] == pytest.approx(token["history_nll"] - token["nll"], abs=1e-5)
            assert token["score"] == pytest.approx(token["rel_norm"], abs=1e-6)
            rels.append(token["rel"])
        kept = [t for t in response if t["kept"]]
        dropped = [t for t in response if not t["kept"]]
        if dropped:
            assert min(t["rel"] for t in kept) >= max(t["rel"] for t in dropped) - 1e-6
    assert max(abs(r) for r in rels) > 1e-3, "the trained adapter should change the NLL"
    assert "REL is 0" not in html_path.read_text(encoding="utf-8")


# ============================================================================================ inspect: CLI errors
@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data.jsonl"], "does not exist"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--rho", "1.5"], "rho must be in (0, 1]"),
    (["--gamma", "2"], "gamma must be in [0, 1]"),
    (["--adapter", "/nonexistent/adapter"], "is not a directory"),
    (["--layer", "7"], "out of range"),
])
def test_inspect_user_errors_are_one_line(workdir, capsys, args, message):
    base = ["inspect", "--model", str(workdir / "tiny"), "--data", str(workdir / "data.jsonl"),
            "--out", str(workdir / "error.html")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress bars of model loading may come first; the error itself is the one last line.
    last = err.strip().splitlines()[-1]
    assert last.startswith("sstoken: error:") and message in last


# ============================================================================================ browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                    else None)
    if chromium is None or chromedriver is None:
        pytest.skip("headless browser tests need Debian's chromium and chromium-driver (apt-get install -y "
                    "chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="sstoken-chromium-")
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(browser, page):
    html_path, data = page
    browser.get(html_path.as_uri())
    return browser, data


def test_page_loads_without_console_errors(loaded):
    driver, _ = loaded
    severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    assert driver.title.startswith("sstoken inspect")
    assert driver.execute_script("return document.readyState") == "complete"


def test_marked_kept_tokens_match_the_json(loaded):
    from selenium.webdriver.common.by import By

    driver, data = loaded
    sections = driver.find_elements(By.CSS_SELECTOR, "section.sample")
    assert len(sections) == len(data["samples"])
    for section, sample in zip(sections, data["samples"]):
        dom_kept = section.find_elements(By.CSS_SELECTOR, ".tok.kept")
        assert len(dom_kept) == sum(t["kept"] for t in sample["tokens"]) == sample["summary"]["n_kept"]
        assert len(section.find_elements(By.CSS_SELECTOR, ".tok.resp")) == len(_response(sample))
        # Kept tokens are visibly marked: the underline bar is a computed style, not just a class name.
        assert driver.execute_script("return getComputedStyle(arguments[0]).boxShadow", dom_kept[0]) != "none"


def _background(driver, element):
    return driver.execute_script("return getComputedStyle(arguments[0]).backgroundColor", element)


def _alpha(rgba: str) -> float:
    parts = rgba[rgba.index("(") + 1:-1].split(",")
    return float(parts[3]) if len(parts) == 4 else 1.0


def test_mode_switch_changes_the_shading(loaded):
    from selenium.webdriver.common.by import By

    driver, data = loaded
    tokens = driver.find_elements(By.CSS_SELECTOR, "section.sample[data-index='0'] .tok.resp")
    shares = [t["attention_share"] for t in _response(data["samples"][0])]
    low, high = shares.index(min(shares)), shares.index(max(shares))
    assert shares[high] - shares[low] > 0.05

    def select(mode):
        driver.find_element(By.CSS_SELECTOR, f"input[name='mode'][value='{mode}']").click()
        assert driver.execute_script("return document.body.getAttribute('data-mode')") == mode

    try:
        combined = _background(driver, tokens[high])
        select("attn")
        attention = _background(driver, tokens[high])
        assert attention != combined
        # Shading follows the signal: more attention share, more opaque.
        assert _alpha(_background(driver, tokens[high])) > _alpha(_background(driver, tokens[low]))
        select("rel")
        # Without an adapter REL is 0 everywhere, so every token gets the same faint REL shade.
        assert _background(driver, tokens[high]) == _background(driver, tokens[low])
        assert _background(driver, tokens[high]) not in (combined, attention)
    finally:
        select("score")


def test_injected_markup_is_shown_as_text_and_never_runs(loaded):
    from selenium.webdriver.common.by import By

    driver, data = loaded
    assert driver.execute_script("return window.__pwned") is None
    assert driver.title.startswith("sstoken inspect") and "pwned" not in driver.title
    assert driver.execute_script("return document.scripts.length") == 1  # the page's own script only
    section = driver.find_element(By.CSS_SELECTOR, f"section.sample[data-index='{N_SAMPLES - 1}']")
    assert section.find_elements(By.CSS_SELECTOR, "img, script") == []
    text = driver.execute_script("return arguments[0].querySelector('.tokens').textContent", section)
    visible = text.replace("·", " ")
    assert INJECTED_CONTEXT in visible
    assert INJECTED_RESPONSE in visible
    # And it shows as text on screen, not as an empty element.
    assert "<script>window.__pwned=1" in section.text.replace("·", " ")


def test_tooltip_opens_on_keyboard_focus_and_on_hover(loaded):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, _ = loaded
    tip = driver.find_element(By.ID, "tip")
    body = driver.find_element(By.TAG_NAME, "body")
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")
    focused = None
    for _ in range(40):  # past the summary links and the mode switch, onto the first response token
        ActionChains(driver).send_keys(Keys.TAB).perform()
        focused = driver.switch_to.active_element
        if "resp" in (focused.get_attribute("class") or ""):
            break
    else:
        pytest.fail("Tab never reached a response token")
    assert tip.is_displayed()
    for label in ("REL", "norm REL", "attn", "score"):
        assert label in tip.text
    assert focused.get_attribute("data-score") in tip.text
    assert focused.get_attribute("data-attn") in tip.text
    body.send_keys(Keys.ESCAPE)
    assert not tip.is_displayed()

    other = driver.find_elements(By.CSS_SELECTOR, "section.sample[data-index='1'] .tok.resp")[2]
    ActionChains(driver).move_to_element(other).perform()
    assert tip.is_displayed()
    assert f"(position {other.get_attribute('data-pos')})" in tip.text


# ============================================================================================ training plots
def test_training_run_records_snapshots_and_writes_plots(trained_run):
    history = json.loads((trained_run / "log_history.json").read_text())
    assert any("loss_kept" in h for h in history)
    payload = json.loads((trained_run / "selection_snapshots.json").read_text())
    snapshots = payload["snapshots"]
    assert [s["step"] for s in snapshots] == snapshot_steps(4) == [1, 2, 3, 4]
    for snap in snapshots:
        assert len(snap["rel"]) == len(snap["attention_share"]) == len(snap["kept"]) > 0
        assert all(0.0 <= a <= 1.0 for a in snap["attention_share"])
        assert 0 < sum(snap["kept"]) < len(snap["kept"])
    # Step 1 runs before any update: the LoRA model equals its base, so REL is 0; later it is not.
    assert max(abs(r) for r in snapshots[0]["rel"]) < 1e-4
    assert max(abs(r) for r in snapshots[-1]["rel"]) > 1e-3
    for name in ("training_curves.png", "selection_distributions.png"):
        _assert_real_png(trained_run / name)


def test_report_command_regenerates_the_plots(trained_run, capsys):
    for name in ("training_curves.png", "selection_distributions.png"):
        (trained_run / name).unlink()
    assert main(["report", str(trained_run)]) == 0
    assert "training_curves.png" in capsys.readouterr().out
    for name in ("training_curves.png", "selection_distributions.png"):
        _assert_real_png(trained_run / name)


def test_plots_without_snapshots_or_rel_still_draw_the_curves(tmp_path):
    history = [{"loss": 2.0 - 0.1 * s, "loss_all": 2.1 - 0.1 * s, "kept_fraction": 1.0, "step": s}
               for s in range(1, 8)] + [{"train_runtime": 1.0, "step": 7}]
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    paths = write_training_plots(tmp_path)
    assert [p.name for p in paths] == ["training_curves.png"]
    _assert_real_png(paths[0])


@pytest.mark.parametrize("content, message", [
    (None, "has no log_history.json"),
    ("{not json", "not readable JSON"),
    ('{"loss": 1}', "must be a list"),
    ('[{"train_runtime": 3.0, "step": 4}]', "no logged training steps"),
])
def test_report_without_log_history_is_a_clear_error(tmp_path, capsys, content, message):
    if content is not None:
        (tmp_path / "log_history.json").write_text(content)
    with pytest.raises(ReportError, match=message.replace("(", r"\(")):
        write_training_plots(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sstoken: error:") and message in err and "\n" not in err


def test_report_on_a_missing_directory_and_a_corrupt_snapshot_file(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        write_training_plots(tmp_path / "missing")
    (tmp_path / "log_history.json").write_text(json.dumps([{"loss_all": 1.0, "step": 1}]))
    (tmp_path / "selection_snapshots.json").write_text('{"snapshots": [{"step": 1}]}')
    with pytest.raises(ReportError, match="selection_snapshots.json is unreadable"):
        write_training_plots(tmp_path)


def test_shared_bins_cover_every_list_and_survive_constant_values():
    from sstoken.report.plots import shared_bins

    edges = shared_bins([[0.0, 0.5], [1.0, -1.0]], bins=4)
    assert edges == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert shared_bins([[0.0, 0.0]], bins=2) == [-0.5, 0.0, 0.5]
    assert shared_bins([[]]) == [0.0, 1.0]


def test_snapshot_recording_on_resume_keeps_earlier_steps_and_replaces_later_ones(tmp_path):
    from types import SimpleNamespace

    import torch

    from sstoken.selection.selectors import Signals
    from sstoken.training.snapshots import SelectionSnapshots
    from sstoken.training.trainer import SelectionEvent

    old = {"snapshots": [{"step": 1, "rel": [0.5], "attention_share": [0.25], "kept": [True]},
                         {"step": 5, "rel": [9.0], "attention_share": [0.9], "kept": [False]}]}
    (tmp_path / "selection_snapshots.json").write_text(json.dumps(old))
    # Resumed from the checkpoint of step 4 of 9: snapshot steps are 1, 3, 5, 7, 9.
    trainer = SimpleNamespace(state=SimpleNamespace(max_steps=9, global_step=4),
                              args=SimpleNamespace(output_dir=str(tmp_path)),
                              selector=SimpleNamespace(name="sstoken"), is_world_process_zero=lambda: True)
    response = torch.tensor([[False, True, True, True]])
    signals = Signals(response_mask=response, current_nll=torch.tensor([[0.0, 1.0, 2.0, 3.0]]),
                      history_nll=torch.tensor([[0.0, 1.5, 2.0, 2.0]]),
                      context_share=torch.tensor([[0.0, 0.2, 0.4, 0.6]]))
    keep = torch.tensor([[False, True, False, True]])
    listener = SelectionSnapshots()

    def event():
        return SelectionEvent(trainer=trainer, inputs={}, signals=signals, keep=keep, progress=0.5,
                              step=trainer.state.global_step + 1)

    listener(event())
    saved = json.loads((tmp_path / "selection_snapshots.json").read_text())
    assert saved["max_steps"] == 9 and saved["method"] == "sstoken"
    first, fifth = saved["snapshots"]
    assert first == old["snapshots"][0]
    assert fifth == {"step": 5, "rel": [0.5, 0.0, -1.0], "attention_share": [0.2, 0.4, 0.6],
                     "kept": [True, False, True]}
    assert listener.snapshots == saved["snapshots"]
    # Not a snapshot step: nothing changes.
    trainer.state.global_step = 5
    listener(event())
    assert json.loads((tmp_path / "selection_snapshots.json").read_text()) == saved
