"""Hints in error messages: did-you-mean over look-alike spellings."""

from __future__ import annotations

import pytest

from sstoken.errors import did_you_mean, lookalike_skeleton

KEYS = ["rho", "gamma", "learning_rate", "max_steps", "rho1"]


@pytest.mark.parametrize("typed, meant", [
    ("rh\u03bf", "rho"),                 # Greek small omicron
    ("GAMM\u0410", "gamma"),             # Cyrillic capital a, and upper case
    ("g\u0430mm\u0430", "gamma"),        # Cyrillic small a, twice
    ("l\u0435arning_rate", "learning_rate"),  # Cyrillic small ie
    ("\uff52\uff48\uff4f", "rho"),       # full-width Latin letters
    ("MAX_STEPS", "max_steps"),          # case alone
    ("rh\u03bfo", "rho"),                # a look-alike and a typo together
    ("gama", "gamma"),                   # a plain typo, as before
])
def test_did_you_mean_finds_the_key_a_look_alike_spelling_imitates(typed, meant):
    assert did_you_mean(typed, KEYS).startswith(f" (did you mean {meant!r}?")


def test_the_hint_names_each_look_alike_character_once():
    hint = did_you_mean("g\u0430mm\u0430", KEYS)
    assert hint == (" (did you mean 'gamma'? 'g\u0430mm\u0430' has a look-alike character: "
                    "\u0430 (U+0430 CYRILLIC SMALL LETTER A))")
    assert did_you_mean("RHO", KEYS) == " (did you mean 'rho'?)"  # nothing to point at: the letters are Latin


def test_no_hint_for_unrelated_words_or_non_strings():
    assert did_you_mean("zzz", KEYS) == ""
    assert did_you_mean("\u0440ho", KEYS) == ""  # Cyrillic er looks like p, and 'pho' is no key
    assert did_you_mean(3, KEYS) == ""


def test_skeleton_folds_case_width_and_greek_and_cyrillic_look_alikes():
    assert lookalike_skeleton("\u0391\u0392\u0421") == "abc"
    assert lookalike_skeleton("\U0001d42b\U0001d421\U0001d428") == "rho"  # mathematical bold letters
    assert lookalike_skeleton("\u03bd") == "v" and lookalike_skeleton("\u039d") == "n"  # nu: v small, N capital
