"""The noisy-real benchmark's pure parts: noise injection and its record, the catalogue, token marking, the runs'
statistics, and the multi-layer attention probe on a tiny model."""

from __future__ import annotations

import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sstoken.errors import ConfigError

NOISY = Path(__file__).resolve().parents[2] / "benchmarks" / "noisy_real"

CLEAN = ("Photosynthesis turns light into chemical energy. Plants take in carbon dioxide and water through "
         "their leaves and roots. In 1779 Jan Ingenhousz showed that light is needed for it. The sugar they make "
         "feeds almost every living thing on Earth.")
MATERIALS_KW = dict(
    disclaimers=("As an AI language model, I cannot browse the internet.", "I apologize for the confusion."),
    donor_texts=("The stock market fell sharply on Monday. Investors worried about rising interest rates.",),
    names=("Lavoisier", "Priestley"),
)


@pytest.fixture(scope="module")
def mods():
    sys.path.insert(0, str(NOISY))
    try:
        return {name: importlib.import_module(name) for name in ("noise", "data", "probe", "compare")}
    finally:
        sys.path.remove(str(NOISY))


@pytest.fixture(scope="module")
def noise(mods):
    return mods["noise"]


@pytest.fixture
def materials(noise):
    return noise.Materials(**MATERIALS_KW)


def _params(noise, kind, **overrides):
    return {**{name: default for name, (_, _, _, default) in noise.PARAMETERS[kind].items()}, **overrides}


# ------------------------------------------------------------------------------------------------ injection
@pytest.mark.parametrize("kind", ["disclaimer", "truncation", "offtopic", "corruption", "repetition", "wrong_fact"])
@pytest.mark.parametrize("seed", range(5))
def test_every_kind_records_edits_that_undo_it_exactly(noise, materials, kind, seed):
    noisy, record = noise.inject(kind, CLEAN, _params(noise, kind), random.Random(seed), noise.Materials(**MATERIALS_KW))
    assert record.kind == kind and noisy != CLEAN
    assert noise.restore(noisy, record) == CLEAN
    edits = sorted(record.edits, key=lambda e: e.start)
    assert all(0 <= e.start <= e.end <= len(noisy) for e in edits)
    assert all(a.end <= b.start for a, b in zip(edits, edits[1:]))  # disjoint
    assert all(noisy[e.start:e.end] != e.original for e in edits)  # every edit changed something
    assert record.ends_early == (kind == "truncation")


def test_disclaimer_edit_is_the_inserted_sentence(noise, materials):
    params = _params(noise, "disclaimer", at_start=1.0)
    noisy, record = noise.inject("disclaimer", CLEAN, params, random.Random(0), materials)
    (edit,) = record.edits
    assert noisy[edit.start:edit.end].strip() in materials.disclaimers and edit.start == 0 and edit.original == ""
    assert noisy[edit.end:] == CLEAN
    params = _params(noise, "disclaimer", at_start=0.0)
    noisy, record = noise.inject("disclaimer", CLEAN, params, random.Random(0), materials)
    assert noisy[:record.edits[0].start] == CLEAN and record.edits[0].end == len(noisy)


def test_truncation_cuts_inside_a_sentence_after_a_word(noise, materials):
    for seed in range(20):
        noisy, record = noise.inject("truncation", CLEAN, _params(noise, "truncation"), random.Random(seed), materials)
        assert CLEAN.startswith(noisy) and noisy[-1].isalnum() and CLEAN[len(noisy)].isspace()
        assert 0.3 * len(CLEAN) <= len(noisy) <= 0.7 * len(CLEAN)
        assert record.edits[0].start == record.edits[0].end == len(noisy)


def test_repetition_repeats_one_sentence_right_after_itself(noise, materials):
    params = _params(noise, "repetition", repeats_min=3, repeats_max=3)
    noisy, record = noise.inject("repetition", CLEAN, params, random.Random(1), materials)
    (edit,) = record.edits
    sentence = next(CLEAN[s:e] for s, e in noise.sentence_spans(CLEAN) if noisy[:edit.start].endswith(CLEAN[s:e]))
    assert noisy[edit.start:edit.end] == (" " + sentence) * 3


def test_offtopic_splices_donor_sentences_between_two_sentences(noise, materials):
    noisy, record = noise.inject("offtopic", CLEAN, _params(noise, "offtopic"), random.Random(3), materials)
    (edit,) = record.edits
    assert noisy[edit.start:edit.end].strip() in materials.donor_texts[0]
    assert noisy[edit.start - 1] == "."  # after a sentence end


def test_corruption_changes_the_chosen_share_of_words_by_one_typo_each(noise, materials):
    noisy, record = noise.inject("corruption", CLEAN, _params(noise, "corruption", word_fraction=0.5),
                                 random.Random(4), materials)
    words = len([w for w in CLEAN.split() if sum(c.isalpha() for c in w) >= 3])
    assert abs(len(record.edits) - 0.5 * words) <= 2
    for edit in record.edits:
        typo, word = noisy[edit.start:edit.end], edit.original
        assert word.isalpha() and abs(len(typo) - len(word)) <= 1 and typo != word


def test_wrong_fact_changes_a_number_before_a_name(noise, materials):
    noisy, record = noise.inject("wrong_fact", CLEAN, {}, random.Random(5), materials)
    (edit,) = record.edits
    assert edit.original == "1779" and noisy[edit.start:edit.end].isdigit()
    without_number = CLEAN.replace("In 1779 ", "Later ")
    noisy, record = noise.inject("wrong_fact", without_number, {}, random.Random(5), materials)
    assert record.edits[0].original == "Jan" or record.edits[0].original in {"Ingenhousz", "Earth"}
    assert noisy[record.edits[0].start:record.edits[0].end] in materials.names


def test_a_kind_that_does_not_fit_is_not_applicable(noise, materials):
    assert not noise.applicable("wrong_fact", "no numbers or names here at all.", {}, materials)
    assert noise.inject("truncation", "Hi.", _params(noise, "truncation"), random.Random(0), materials) is None
    assert not noise.applicable("repetition", "Yes. No.", {}, materials)


def test_noisy_mix_gives_each_kind_its_share_of_rows_and_is_deterministic(noise, materials):
    catalogue = noise.parse_catalogue({"seed": 3, "kinds": {"disclaimer": {"rate": 0.25}, "repetition": {"rate": 0.5}}})
    texts = [CLEAN.replace("Plants", f"Plant {i}") for i in range(8)]
    mix = noise.noisy_mix(texts, catalogue, materials)
    kinds = [record.kind for _, record in mix]
    assert kinds.count("disclaimer") == 2 and kinds.count("repetition") == 4 and kinds.count(None) == 2
    assert all(noise.restore(text, record) == clean for (text, record), clean in zip(mix, texts))
    assert mix == noise.noisy_mix(texts, catalogue, materials)


def test_noisy_mix_refuses_a_rate_that_too_few_rows_can_take(noise, materials):
    catalogue = noise.parse_catalogue({"kinds": {"wrong_fact": {"rate": 1.0}}})
    with pytest.raises(ConfigError, match="wrong_fact.*only 1 free rows"):
        noise.noisy_mix([CLEAN, "nothing to change here at all."], catalogue, materials)


def test_disclaimers_are_mined_most_frequent_first(noise):
    texts = ["I apologize for the confusion. Here is the fixed code.",
             "I apologize for the confusion. The answer is 4.",
             "Sure! As an AI language model, I cannot predict the future.",
             'He said "I cannot do that, Dave." and left.']
    assert noise.mine_disclaimers(texts) == ["I apologize for the confusion.",
                                             "As an AI language model, I cannot predict the future."]


# ------------------------------------------------------------------------------------------------ tokens
def test_token_kinds_counts_non_space_overlap_and_whitespace_tokens_inside(noise):
    rendering = "User: q\nBot: Sorry. Hello world<end>"
    start, end = rendering.index("Sorry"), rendering.index("<end>")
    record = noise.NoiseRecord("disclaimer", (noise.Edit(0, 7, ""),))  # "Sorry. " with its separator
    offsets = [(0, 13), (13, 19), (19, 20), (20, 26), (26, 32), (32, 37)]  # "Sorry." " " " Hello"...
    labels = [-100, 1, 1, 1, 1, 1]
    kinds = noise.token_kinds(rendering, offsets, labels, start, record, end)
    # " Hello" shares only its space with the edit: clean; the lone space lies inside it: noise
    assert kinds == [None, "disclaimer", "disclaimer", None, None, None]
    cut = noise.NoiseRecord("truncation", (noise.Edit(end - start, end - start, " rest"),), ends_early=True)
    assert noise.token_kinds(rendering, offsets, labels, start, cut, end) == [None] * 5 + ["truncation"]


def test_encoded_rows_mark_exactly_the_noise_tokens(mods, tok, materials):
    noise, data = mods["noise"], mods["data"]
    sentence = materials.disclaimers[1]
    noisy, record = noise.inject("disclaimer", CLEAN, {"at_start": 1.0, "pool_size": 1}, random.Random(0),
                                 noise.Materials(disclaimers=(sentence,), donor_texts=(), names=()))
    row = data.Row("r", "Tell me about photosynthesis.", CLEAN, noisy, record)
    item = data.encode(tok, row, 512)
    marked = [i for i, k in zip(item["input_ids"], item["kinds"]) if k]
    assert tok.decode(marked).strip() == sentence
    assert all(label != -100 for label, k in zip(item["labels"], item["kinds"]) if k)
    clean_item = data.encode(tok, row, 512, noisy=False)
    assert not any(clean_item["kinds"]) and tok.decode(clean_item["input_ids"]).count(CLEAN) == 1
    cut, cut_record = noise.inject("truncation", CLEAN, {"keep_min": 0.3, "keep_max": 0.7}, random.Random(0),
                                   materials)
    item = data.encode(tok, data.Row("r", "Tell me.", CLEAN, cut, cut_record), 512)
    marked = [i for i, k in zip(item["input_ids"], item["kinds"]) if k]
    assert marked == [tok.convert_tokens_to_ids("<|im_end|>")]  # the end of turn after the cut, nothing else
    assert data.encode(tok, row, 20) is None  # does not fit


# ------------------------------------------------------------------------------------------------ catalogue
def test_default_catalogue_loads(noise):
    catalogue = noise.load_catalogue()
    assert set(catalogue.kinds) == set(noise.KINDS)
    assert sum(s.rate for s in catalogue.kinds.values()) <= 1


@pytest.mark.parametrize("obj, message", [
    ([], "expected a JSON object"),
    ({"kinds": {}}, "non-empty object"),
    ({"kinds": {"disclaimr": {"rate": 0.1}}}, r"unknown noise kind 'disclaimr' \(did you mean 'disclaimer'\?\)"),
    ({"kinds": {"truncation": {}}}, "needs a 'rate'"),
    ({"kinds": {"truncation": {"rate": 1.5}}}, r"kinds.truncation.rate must be in \[0.0, 1.0\]"),
    ({"kinds": {"truncation": {"rate": "high"}}}, "rate must be a number"),
    ({"kinds": {"truncation": {"rate": 0.1, "keep_mn": 0.2}}}, r"unknown parameter 'keep_mn' \(did you mean 'keep_min'"),
    ({"kinds": {"repetition": {"rate": 0.1, "repeats_min": 2.5}}}, "repeats_min must be an integer"),
    ({"kinds": {"repetition": {"rate": 0.1, "repeats_min": 6, "repeats_max": 3}}}, "repeats_min .6. is above"),
    ({"kinds": {"disclaimer": {"rate": 0.6}, "offtopic": {"rate": 0.6}}}, "add up to 1.2"),
    ({"kinds": {"disclaimer": {"rate": 0.1}}, "seeds": 1}, r"unknown key 'seeds' \(did you mean 'seed'\?\)"),
])
def test_bad_catalogues_get_one_clear_line(noise, obj, message):
    with pytest.raises(ConfigError, match=message) as info:
        noise.parse_catalogue(obj, "cat.json")
    assert "\n" not in str(info.value) and str(info.value).startswith("cat.json")


def test_catalogue_files_that_cannot_be_read(noise, tmp_path):
    with pytest.raises(ConfigError, match="cannot read noise catalogue"):
        noise.load_catalogue(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{kinds: }")
    with pytest.raises(ConfigError, match="not valid JSON"):
        noise.load_catalogue(bad)


def test_a_bad_catalogue_on_the_command_line_is_one_line_and_status_2(tmp_path):
    bad = tmp_path / "cat.json"
    bad.write_text(json.dumps({"kinds": {"typos": {"rate": 0.1}}}))
    done = subprocess.run([sys.executable, str(NOISY / "compare.py"), "--catalogue", str(bad), "--report-only"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown noise kind 'typos'" in done.stderr


# ------------------------------------------------------------------------------------------------ runs
def test_a_claim_is_held_once_and_taken_over_from_a_dead_process(tmp_path):
    from runner import claim, release

    assert claim(tmp_path, "unit.json") and claim(tmp_path, "unit.json")  # this process holds it
    (tmp_path / "unit.json.claim").write_text("999999999")  # no such process
    assert claim(tmp_path, "unit.json")
    (tmp_path / "other.json.claim").write_text(str(os.getppid()))  # a live process holds it
    assert not claim(tmp_path, "other.json") and (tmp_path / "other.json.claim").read_text() == str(os.getppid())
    (tmp_path / "odd.json.claim").write_text("")  # not written by the runner: left alone
    assert not claim(tmp_path, "odd.json") and (tmp_path / "odd.json.claim").exists()
    release(tmp_path, "unit.json")
    (tmp_path / "unit.json").write_text("{}")
    assert not claim(tmp_path, "unit.json")  # done


def _claim_at_once(folder, start, done, won):
    from runner import claim

    start.wait()
    won.put(claim(folder, "unit.json"))
    done.wait()  # every claimant stays alive until all have tried: a live holder's claim must hold


def test_workers_that_claim_a_unit_at_the_same_moment_get_it_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    n = 6
    start, done, won = context.Barrier(n), context.Barrier(n), context.Queue()
    workers = [context.Process(target=_claim_at_once, args=(tmp_path, start, done, won)) for _ in range(n)]
    for worker in workers:
        worker.start()
    results = [won.get() for _ in range(n)]
    for worker in workers:
        worker.join()
    assert sorted(results) == [False] * (n - 1) + [True]
    assert list(tmp_path.iterdir()) == [tmp_path / "unit.json.claim"]  # no draft left behind


def test_comparison_pairs_with_full_noisy_and_measures_the_gap_recovered(mods):
    compare = mods["compare"]

    def run(method, seed, nll):
        return {"method": method, "seed": seed, "held_out_nll": nll, "wall_s": 1.0,
                "kept": {"all": {"noise": 0.5, "clean": 0.8, "disclaimer": 0.1}}, "mean_p": {"noise": 0.2}}

    results = [run("full_noisy", s, [2.0, 2.2]) for s in (0, 1)] + [run("full_clean", s, [1.0, 1.2]) for s in (0, 1)]
    results += [run("sstoken", s, [1.5, 1.7]) for s in (0, 1)]
    agg = compare.aggregate(results, ["disclaimer"])
    assert agg["noisy_to_clean_gap"] == pytest.approx(1.0)
    entry = agg["methods"]["sstoken"]
    assert entry["delta_vs_full_noisy"]["mean"] == pytest.approx(-0.5)
    assert entry["delta_vs_full_noisy"]["ci95"] == pytest.approx([-0.5, -0.5])
    assert entry["gap_recovered"] == pytest.approx(0.5)
    assert entry["kept"] == {"noise": 0.5, "clean": 0.8, "disclaimer": 0.1}
    assert "| sstoken | 2 | 1.6000" in compare.markdown(agg, ["disclaimer"])


def test_comparison_report_says_which_selector_is_recommended(mods, tmp_path):
    compare, noise = mods["compare"], mods["noise"]
    (tmp_path / "runs").mkdir()
    for method, nll in (("full_noisy", [2.0, 2.2]), ("full_clean", [1.0, 1.2])):
        result = {"method": method, "seed": 0, "held_out_nll": nll, "wall_s": 1.0, "kept": None, "mean_p": None}
        (tmp_path / "runs" / compare.unit_name(method, 0)).write_text(json.dumps(result))
    (tmp_path / "runs" / "base.json").write_text(json.dumps({"held_out_nll": [2.5, 2.7]}))
    compare.report(tmp_path, noise.load_catalogue(), {"size": "tiny"})
    document = json.loads((tmp_path / "compare.json").read_text())
    assert document["base_held_out_nll"] == pytest.approx(2.6)
    assert "base model before fine-tuning: 2.6000" in (tmp_path / "compare.md").read_text()
    assert document["recommended"] == compare.RECOMMENDED
    assert document["recommended_reason"] == compare.RECOMMENDED_REASON and "BENCHMARKS.md" in compare.RECOMMENDED_REASON
    assert compare.RECOMMENDED is None or compare.RECOMMENDED in compare.ALL_METHODS
    assert (tmp_path / "compare.png").stat().st_size > 0 and "| full_clean | 1 |" in (tmp_path / "compare.md").read_text()


def test_comparison_pairs_seeds_that_both_methods_ran(mods):
    compare = mods["compare"]
    results = [{"method": "full_noisy", "seed": s, "held_out_nll": [2.0 + s, 2.0 + s], "wall_s": 1.0}
               for s in (0, 1, 2)]
    results += [{"method": "attn", "seed": s, "held_out_nll": [1.0 + 2 * s, 1.0 + 2 * s], "wall_s": 1.0}
                for s in (0, 1)]
    entry = compare.aggregate(results, [])["methods"]["attn"]
    # seed 0: 1 − 2 = −1, seed 1: 3 − 3 = 0 (full_noisy's seed 2 has no partner)
    assert entry["seeds"] == [0, 1] and entry["delta_vs_full_noisy"]["per_seed"] == pytest.approx([-1.0, 0.0])
    assert entry["delta_vs_full_noisy"]["mean"] == pytest.approx(-0.5)
    assert entry["held_out_nll"]["mean"] == pytest.approx(2.0) and entry["delta_vs_full_clean"] is None


def test_weight_recorder_averages_p_of_each_kinds_response_tokens(mods):
    import math
    from types import SimpleNamespace

    from sstoken.selection.nll_cache import sample_key

    compare = mods["compare"]
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    recorder = compare.WeightRecorder({sample_key(ids[0, :4]): [None, None, "disclaimer", "repetition"]})
    nll = torch.tensor([[9.0, math.log(2), math.log(4), math.log(5), 9.0]])  # p = 1/2, 1/4, 1/5 on the response
    event = SimpleNamespace(inputs={"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])},
                            progress=0.5, signals=SimpleNamespace(current_nll=nll,
                                                    response_mask=torch.tensor([[False, True, True, True, False]])))
    recorder(event)
    recorder(event)  # a second step of the same row counts again
    means = recorder.means()
    # "first": the first response token when it is clean, as the keep record counts it
    assert means == pytest.approx({"clean": 0.5, "first": 0.5, "disclaimer": 0.25, "repetition": 0.2,
                                   "noise": 0.225})


def test_run_workers_prepares_once_then_starts_workers_without_the_workers_option(tmp_path):
    from runner import run_workers

    script = tmp_path / "unit.py"
    script.write_text("import os, sys, uuid\n"
                      "name = sys.argv[-1].lstrip('-').replace('-', '_') + '-' + uuid.uuid4().hex\n"
                      "open(os.path.join(os.path.dirname(__file__), name), 'w').write("
                      "' '.join(sys.argv[1:]) + ' ' + os.environ['OMP_NUM_THREADS'])\n")
    run_workers(str(script), ["--seeds", "0", "1", "--workers", "3", "--out", "x"], 3)
    written = {p.name.split("-")[0]: p.read_text() for p in tmp_path.iterdir() if p.name != "unit.py"}
    runs = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name != "unit.py")
    assert runs == ["caches_only", "worker", "worker", "worker"]
    assert written["caches_only"] == "--seeds 0 1 --out x --caches-only 1"
    assert written["worker"] == "--seeds 0 1 --out x --worker 1"
    (tmp_path / "fail.py").write_text("import sys\nsys.exit(0 if '--caches-only' in sys.argv else 3)\n")
    with pytest.raises(SystemExit, match="a worker failed"):
        run_workers(str(tmp_path / "fail.py"), ["--workers=2"], 2)


# ------------------------------------------------------------------------------------------------ data
def _pool(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        answer = (f"Topic {i} has a long history. In 19{i % 90 + 10} Marie Curie wrote about it in a letter. "
                  f"Today people still study topic {i} at school and at work.")
        if i % 7 == 0:
            answer = "Sure. " + answer + " As an AI language model, I cannot see the future."
        rows.append({"id": f"p{i:03d}", "meta": {"quality": i % 5},
                     "messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                                  {"role": "assistant", "content": answer}]})
    return rows


def test_texts_are_disjoint_parts_with_noise_only_where_trained_or_probed(mods):
    data, noise = mods["data"], mods["noise"]
    shape = data.Shape(n_train=10, n_held_out=4, n_reference=3, n_probe=10, max_prompt_chars=100,
                       max_response_chars=400, min_response_chars=50)
    catalogue = noise.parse_catalogue({"seed": 1, "kinds": {"repetition": {"rate": 0.3},
                                                            "corruption": {"rate": 0.2}}})
    pool = _pool(60)
    texts = data.build_texts(pool, shape, catalogue)
    parts = {name: getattr(texts, name) for name in ("train", "held_out", "reference", "probe")}
    assert {k: len(v) for k, v in parts.items()} == {"train": 10, "held_out": 4, "reference": 3, "probe": 10}
    ids = [r.id for rows in parts.values() for r in rows]
    assert len(set(ids)) == len(ids), "the parts share no row"
    quality = {r["id"]: r["meta"]["quality"] for r in pool}
    unchosen = [q for i, q in quality.items() if i not in set(ids)]
    assert min(quality[i] for i in ids) >= max(unchosen), "the chosen rows are the top of the quality score"
    assert all(r.noisy == r.clean and r.record.kind is None for r in texts.held_out + texts.reference)
    kinds = [r.record.kind for r in texts.train]
    assert kinds.count("repetition") == 3 and kinds.count("corruption") == 2
    assert all(noise.restore(r.noisy, r.record) == r.clean for r in texts.train + texts.probe)
    donors = set(texts.materials.donor_texts)
    assert not donors & {r.clean for rows in parts.values() for r in rows}, "splices come from other rows"
    again = data.build_texts(pool, shape, catalogue)
    assert [(r.id, r.noisy) for r in again.train] == [(r.id, r.noisy) for r in texts.train]
    with pytest.raises(SystemExit, match="27 are needed"):
        data.build_texts(pool[:20], shape, catalogue)


# ------------------------------------------------------------------------------------------------ probe
def test_layer_shares_capture_each_layers_heads_in_one_forward(mods):
    from sstoken.selection.attention import context_share
    from sstoken.testing import tiny_model

    probe = mods["probe"]
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    context = torch.zeros(2, 10, dtype=torch.bool)
    context[:, :4] = True
    shares = probe.LayerShares(model, {"first": 0, "last": -1}, main="last")
    with torch.no_grad(), shares.capture(context, mask) as main:
        model(input_ids=ids, attention_mask=mask)
    for name, layer in (("first", 0), ("last", -1)):
        assert shares.last[name].shape == (2, 4, 10)
        torch.testing.assert_close(shares.last[name].mean(1), context_share(model, ids, mask, context, layer=layer))
    torch.testing.assert_close(main.share, shares.last["last"].mean(1))
    with pytest.raises(ValueError, match="layers must differ"):
        probe.LayerShares(model, {"middle": 1, "last": -1}, main="last")


def test_token_table_scores_a_separating_signal_and_its_orientation(mods):
    from sstoken.selection.selectors import Signals

    probe = mods["probe"]
    table = probe.TokenTable()
    response = torch.tensor([[False, True, True, True, True]])
    base = torch.tensor([[0.0, 5.0, 1.0, 5.0, 1.0]])  # noise (positions 1, 3) is novel to the base model
    signals = Signals(response_mask=response, current_nll=torch.full((1, 5), 1.0), history_nll=base.clone(),
                      reference_nll=base)
    heads = {"first": torch.rand(1, 2, 5), "middle": torch.rand(1, 2, 5), "last": torch.rand(1, 2, 5)}
    row = {"input_ids": [0] * 5, "kinds": [None, "disclaimer", None, "disclaimer", None]}
    table.add("late", [row], signals, heads)
    stats = table.statistics({"noise": ("disclaimer",), "disclaimer": ("disclaimer",)})["late"]
    assert stats["tokens"] == {"clean": 2, "disclaimer": 2}
    base_nll = stats["signals"]["base_nll"]["disclaimer"]
    assert base_nll["auc_noise_high"] == 1.0 and base_nll["noise_is"] == "high"
    assert base_nll["clean_dropped_at_90pct_noise_recall"] == 0.0
    assert stats["signals"]["rel_base"]["noise"]["auc_noise_high"] == 1.0  # base − current
    assert set(stats["heads"]) == {f"share_{layer}_h{h}" for layer in heads for h in range(2)}


def test_probe_scores_rows_through_the_training_pipeline(mods, tmp_path):
    """measure(): one no-grad pass of the current model gives the signals the selector would see."""
    from sstoken.selection.attention import context_share
    from sstoken.selection.nll_cache import NLLCache, build_nll_cache
    from sstoken.testing import random_rows, tiny_model, tiny_tokenizer, tiny_trainer

    probe = mods["probe"]
    rows = random_rows([4, 6, 3], [7, 5, 8], seed=3)
    for row in rows:
        row["kinds"] = [("repetition" if i % 3 == 0 else None) if label != -100 else None
                        for i, label in enumerate(row["labels"])]
    base = tiny_model("llama", num_hidden_layers=3)
    build_nll_cache(base, tiny_tokenizer(), rows, str(tmp_path / "base"), 32, progress=False)
    trainer = tiny_trainer(tmp_path / "run", [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows],
                           model=tiny_model("llama", num_hidden_layers=3), selection_method=probe.EMAFullSelector.name, history="ema",
                           max_steps=1, per_device_train_batch_size=3, learning_rate=1e-2, disable_tqdm=True)
    trainer.train()
    layers = probe.probe_layers(trainer.model)
    assert layers == {"first": 0, "middle": 1, "last": 2}
    shares = probe.LayerShares(trainer.model, layers, main="last")
    table = probe.TokenTable()
    probe.measure(trainer, rows, NLLCache.open(str(tmp_path / "base"), role="reference cache"), shares, table,
                  "late", batch_size=2)
    scored = table.phases["late"]
    n_response = sum(sum(label != -100 for label in r["labels"]) for r in rows)
    assert len(scored["kind"]) == n_response
    assert scored["kind"].count("repetition") == sum(k == "repetition" for r in rows for k in r["kinds"])
    base_nll, current, rel = (torch.cat(scored[k]) for k in ("base_nll", "current_nll", "rel_base"))
    torch.testing.assert_close(rel, base_nll - current)
    gamma = probe.GAMMA  # ssToken's score: its REL normalised in the sample, mixed with the last layer's share
    torch.testing.assert_close(torch.cat(scored["sstoken_score"]), gamma * torch.cat(scored["rel_base_in_sample"])
                               + (1 - gamma) * torch.cat(scored["share_last"]))
    assert not torch.allclose(base_nll, current), "one step of training moved the current model"
    # the share of the last layer for the first row, as the library's own probe computes it
    ids = torch.tensor([rows[0]["input_ids"]])
    context = torch.tensor([[label == -100 for label in rows[0]["labels"]]])
    with torch.no_grad():
        expected = context_share(trainer.model, ids, torch.ones_like(ids), context, layer=-1)[0][~context[0]]
    torch.testing.assert_close(scored["share_last"][0], expected, atol=1e-5, rtol=0)
    stats = table.statistics({"noise": ("repetition",)})["late"]
    # the ROC area over these tokens, counted pair by pair: P(a repetition token's base NLL > a clean token's)
    noise = base_nll[[k == "repetition" for k in scored["kind"]]]
    clean = base_nll[[k is None or k == "clean" for k in scored["kind"]]]
    pairs = (noise[:, None] > clean[None, :]).float() + 0.5 * (noise[:, None] == clean[None, :]).float()
    assert stats["signals"]["base_nll"]["noise"]["auc_noise_high"] == pytest.approx(float(pairs.mean()), abs=1e-6)


def test_probe_summary_averages_seeds_and_names_the_best_head(mods, tmp_path):
    probe, noise = mods["probe"], mods["noise"]

    def run(seed, area, head_areas):
        stat = {"auc_noise_high": area, "clean_dropped_at_90pct_noise_recall": 0.1 * (seed + 1)}
        phase = {"tokens": {"clean": 10, "corruption": 2}, "signals": {s: {"corruption": stat} for s in
                                                                       ("base_nll", "share_last")},
                 "heads": {f"share_last_h{h}": {"corruption": a} for h, a in enumerate(head_areas)}}
        return {"model": "gemma", "seed": seed, "layers": {"first": 0, "middle": 9, "last": 17}, "phases":
                {"early": phase, "late": phase}, "rows": {}, "steps": 16, "train": {}, "probes": {}, "wall_s": 2.0,
                "device": "cpu", "finished": "now"}

    results = [run(0, 0.8, [0.55, 0.2]), run(1, 0.6, [0.45, 0.3])]
    summary = probe.aggregate(results)["gemma"]
    late = summary["phases"]["late"]
    base_nll = late["signals"]["base_nll"]["corruption"]
    assert base_nll["auc_noise_high"] == pytest.approx(0.7) and base_nll["auc_noise_high_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert base_nll["clean_dropped_at_90pct_noise_recall"] == pytest.approx(0.15)
    assert late["best_head"]["corruption"] == {"head": "share_last_h1", "auc_noise_high": pytest.approx(0.25),
                                               "sd": pytest.approx(0.0707, abs=1e-4)}
    assert late["tokens_over_seeds"] == {"clean": 20, "corruption": 4}
    (tmp_path / "runs").mkdir()
    for r in results:
        (tmp_path / "runs" / probe.unit_name("gemma", r["seed"])).write_text(json.dumps(r))
    probe.report(tmp_path, noise.parse_catalogue({"kinds": {"corruption": {"rate": 0.5}}}))
    table = (tmp_path / "probe.md").read_text()
    assert "| base_nll | - | 0.70 ± 0.14 |" in table and "0.25 (last_h1)" in table
    assert (tmp_path / "probe.png").stat().st_size > 0


def test_results_go_beside_the_other_benchmarks_results(mods):
    # The committed results the write-up quotes are where both scripts write by default.
    assert mods["data"].RESULTS == NOISY.parent / "results" / "noisy-real"
    assert (mods["data"].RESULTS / "compare.json").is_file() and (mods["data"].RESULTS / "probe.json").is_file()
