"""The prompt language: kohya's dynamic variants and in-prompt options, WebUI attention weights."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from library.generation.prompts import PromptSpec, expand_dynamic_prompt, parse_prompt_options
from library.text.encoding import tokenize_prompts
from library.text.tokenizer import shipped_tokenizer
from library.text.weighting import (
    BREAK_PIECE,
    apply_token_weights,
    parse_prompt_attention,
    weighted_token_chunks,
)


@pytest.fixture(scope="module")
def sd1_tokenizer():
    return shipped_tokenizer(False)


@pytest.fixture(scope="module")
def sd2_tokenizer():
    return shipped_tokenizer(True)


# ---------------------------------------------------------------------------------------------
# Dynamic prompts


def test_prompt_without_groups_comes_back_once():
    assert expand_dynamic_prompt("a cat", random.Random(0), repeat_count=4) == ["a cat"]


def test_random_choice_draws_like_kohya():
    expected_rng = random.Random(3)
    expected_rng.randint(1, 1)  # kohya draws the count first, then the sample
    expected = expected_rng.sample(["red", "green", "blue"], 1)[0]
    assert expand_dynamic_prompt("a {red|green|blue} cat", random.Random(3)) == [f"a {expected} cat"]


def test_random_groups_repeat_count_prompts_each_drawn_anew():
    prompts = expand_dynamic_prompt("{a|b|c|d|e|f|g|h} and {x|y}", random.Random(1), repeat_count=20)
    assert len(prompts) == 20
    assert len(set(prompts)) > 1
    for prompt in prompts:
        first, second = prompt.split(" and ")
        assert first in "abcdefgh" and second in ("x", "y")


def test_same_seed_same_prompts():
    line = "{a|b|c}, {2$$x|y|z}, {1-3$$p|q|r}"
    assert expand_dynamic_prompt(line, random.Random(7), repeat_count=5) == expand_dynamic_prompt(
        line, random.Random(7), repeat_count=5
    )


def test_enumerate_all_variants():
    assert expand_dynamic_prompt("a {e$$cat|dog} photo", random.Random(0)) == ["a cat photo", "a dog photo"]
    assert expand_dynamic_prompt("{E$$a|b} {e$$x|y}", random.Random(0)) == ["a x", "a y", "b x", "b y"]


def test_enumerate_count_range_and_separator():
    assert expand_dynamic_prompt("{e$$1-2$$a|b}", random.Random(0)) == ["a", "b", "a, b"]
    assert expand_dynamic_prompt("{e$$2$$ and $$a|b|c}", random.Random(0)) == [
        "a and b",
        "a and c",
        "b and c",
    ]


def test_choose_several_distinct_variants():
    for prompt in expand_dynamic_prompt("{2$$a|b|c}", random.Random(5), repeat_count=10):
        chosen = prompt.split(", ")
        assert len(chosen) == 2 and len(set(chosen)) == 2 and set(chosen) <= {"a", "b", "c"}
    for prompt in expand_dynamic_prompt("{1-3$$ + $$a|b|c}", random.Random(5), repeat_count=10):
        assert 1 <= len(prompt.split(" + ")) <= 3


def test_count_is_clamped_to_the_variants():
    assert expand_dynamic_prompt("{e$$5$$a|b}", random.Random(0)) == ["a, b"]
    assert expand_dynamic_prompt("{e$$3-1$$a|b}", random.Random(0)) == ["a", "b", "a, b"]
    assert "" in expand_dynamic_prompt("{e$$0-1$$a|b}", random.Random(0))


def test_bad_count_warns_and_picks_one(caplog):
    with caplog.at_level(logging.WARNING):
        assert expand_dynamic_prompt("{e$$1-2-3$$a|b}", random.Random(0)) == ["a", "b"]
    assert "invalid count '1-2-3'" in caplog.text


def test_enumeration_with_random_group_draws_for_each_prompt():
    prompts = expand_dynamic_prompt("{e$$a|b|c|d} {x|y|z}", random.Random(2))
    assert [p.split()[0] for p in prompts] == ["a", "b", "c", "d"]
    assert all(p.split()[1] in ("x", "y", "z") for p in prompts)


def test_options_inside_variants_are_expanded_too():
    prompts = expand_dynamic_prompt("cat --n {e$$blurry|dark}", random.Random(0))
    assert [parse_prompt_options(p).negative_prompt for p in prompts] == ["blurry", "dark"]


# ---------------------------------------------------------------------------------------------
# In-prompt options


def test_all_options():
    spec = parse_prompt_options(
        "a cat on a mat --n blurry, low quality --w 768 --h 512 --s 30 --d 1,2,3 --l 7.5 --nl 4 --ss Euler_A"
    )
    assert spec == PromptSpec(
        prompt="a cat on a mat",
        negative_prompt="blurry, low quality",
        width=768,
        height=512,
        steps=30,
        seeds=[1, 2, 3],
        scale=7.5,
        negative_scale=4.0,
        sampler="euler_a",
    )


def test_no_options_gives_none_fields():
    assert parse_prompt_options("  just a prompt  ") == PromptSpec(prompt="just a prompt")


def test_option_names_ignore_case_and_last_wins():
    spec = parse_prompt_options("x --W 640 --H 320 --w 704")
    assert (spec.width, spec.height) == (704, 320)


def test_steps_clamped_and_single_seed():
    assert parse_prompt_options("x --s 5000 --d 42").steps == 1000
    assert parse_prompt_options("x --s 0").steps == 1
    assert parse_prompt_options("x --d 42").seeds == [42]


def test_network_strengths_are_a_signed_list():
    assert parse_prompt_options("x --am 0.8").network_multipliers == [0.8]
    assert parse_prompt_options("x --am -0.5, 1,.25").network_multipliers == [-0.5, 1.0, 0.25]


def test_negative_scale_none_switches_it_off():
    spec = parse_prompt_options("x --nl none")
    assert spec.negative_scale is None and spec.negative_scale_off


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("x --w wide", "--w: 'wide' is not a whole number"),
        ("x --h 0", "--h: '0' is not a whole number of pixels from 1 to 8192"),
        ("x --w 10240", "--w: '10240' is not a whole number of pixels from 1 to 8192"),
        ("x --l nan", "--l: 'nan' is not a number"),
        ("x --d 1,,2", "--d: '1,,2' is not a seed"),
        ("x --l high", "--l: 'high' is not a number"),
        ("x --ss fastest", "--ss: 'fastest' is not a sampler"),
        ("x --zz 3", "unknown prompt option --zz"),
        ("x --t 0.5", "--t (img2img strength) is not supported"),
        ("x --am strong", "--am: 'strong' is not a strength"),
    ],
)
def test_bad_or_unknown_options_warn_and_are_ignored(caplog, line, message):
    with caplog.at_level(logging.WARNING):
        spec = parse_prompt_options(line)
    assert message in caplog.text
    assert spec == PromptSpec(prompt="x")


# ---------------------------------------------------------------------------------------------
# Attention weights


def test_webui_examples():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]


def test_nested_weights_multiply():
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [
        ("a ", 1.0),
        ("house", 1.1 * 1.1 * 1.3),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.1**4),
        (".", 1.1),
    ]
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    ("prompt", "weight"),
    [("(word)", 1.1), ("((word))", 1.21), ("[word]", 1 / 1.1), ("(word:1.3)", 1.3), ("(word: 0.7 )", 0.7)],
)
def test_single_weights(prompt, weight):
    ((text, got),) = parse_prompt_attention(prompt)
    assert text == "word" and got == pytest.approx(weight)


def test_escapes_and_stray_brackets_are_text():
    assert parse_prompt_attention(r"a \(b\) c\\d") == [("a (b) c\\d", 1.0)]
    assert parse_prompt_attention("a) b] c:d") == [("a) b] c:d", 1.0)]


def test_break_splits_at_any_depth_but_only_whole_words():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK_PIECE, ("b", 1.0)]
    got = parse_prompt_attention("(a BREAK b)")
    assert (
        got[1] == BREAK_PIECE and got[0] == ("a", pytest.approx(1.1)) and got[2] == ("b", pytest.approx(1.1))
    )
    assert parse_prompt_attention("BREAKFAST break") == [("BREAKFAST break", 1.0)]


def test_empty_prompt():
    assert parse_prompt_attention("") == [("", 1.0)]


# --- token chunks -----------------------------------------------------------------------------


def _content(ids: torch.Tensor, tokenizer) -> list[int]:
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return [int(i) for i in ids if int(i) not in special]


def test_plain_prompt_matches_the_tokenizer(sd1_tokenizer):
    ids, weights = weighted_token_chunks(sd1_tokenizer, "a photo of a cat", max_chunks=3)
    expected = sd1_tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == expected
    assert weights.shape == (1, 77) and torch.all(weights == 1.0)


@pytest.mark.parametrize("v2", [False, True])
def test_long_prompts_chunk_like_text_encoding(v2):
    tokenizer = shipped_tokenizer(v2)
    prompt = " ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    ids, _ = weighted_token_chunks(tokenizer, prompt, max_chunks=3, min_chunks=3)
    assert torch.equal(ids, tokenize_prompts(tokenizer, [prompt], 225)[0])


def test_weights_follow_their_tokens(sd1_tokenizer):
    ids, weights = weighted_token_chunks(sd1_tokenizer, "a (red:1.5) [cat]", max_chunks=1)
    red = sd1_tokenizer("red", add_special_tokens=False).input_ids[0]
    cat = sd1_tokenizer("cat", add_special_tokens=False).input_ids[0]
    row, weight_row = ids[0].tolist(), weights[0]
    assert weight_row[row.index(red)] == pytest.approx(1.5)
    assert weight_row[row.index(cat)] == pytest.approx(1 / 1.1)
    assert weight_row[0] == 1.0 and torch.all(weight_row[row.index(cat) + 1 :] == 1.0)


def test_break_closes_the_chunk(sd2_tokenizer):
    tok = sd2_tokenizer
    ids, weights = weighted_token_chunks(tok, "a red cat BREAK (blue:2) sky", max_chunks=3)
    assert ids.shape == (2, 77)
    assert _content(ids[0], tok) == tok("a red cat", add_special_tokens=False).input_ids
    assert _content(ids[1], tok) == tok("blue sky", add_special_tokens=False).input_ids
    first = ids[0].tolist()
    assert (
        first[0] == tok.bos_token_id and first[4] == tok.eos_token_id and set(first[5:]) == {tok.pad_token_id}
    )
    assert weights[1, 1] == 2.0 and weights[1, 2] == 1.0


def test_break_at_start_and_twice_gives_empty_chunks_like_the_webui(sd1_tokenizer):
    ids, _ = weighted_token_chunks(sd1_tokenizer, "BREAK a BREAK BREAK b", max_chunks=5)
    assert ids.shape == (4, 77)
    assert [len(_content(row, sd1_tokenizer)) for row in ids] == [0, 1, 0, 1]


def test_too_long_prompt_is_truncated_with_a_warning(sd1_tokenizer, caplog):
    prompt = " ".join(f"word{i}" for i in range(60))
    with caplog.at_level(logging.WARNING):
        ids, weights = weighted_token_chunks(sd1_tokenizer, prompt, max_chunks=1)
    assert ids.shape == weights.shape == (1, 77)
    assert ids[0, -1] == sd1_tokenizer.eos_token_id
    assert "at most 1 are allowed" in caplog.text


def test_min_chunks_pads_with_empty_windows(sd2_tokenizer):
    ids, weights = weighted_token_chunks(sd2_tokenizer, "cat", max_chunks=3, min_chunks=3)
    assert ids.shape == (3, 77)
    assert ids[2].tolist() == [sd2_tokenizer.bos_token_id, sd2_tokenizer.eos_token_id] + [0] * 75
    assert torch.all(weights[1:] == 1.0)


def test_chunk_limits_are_checked(sd1_tokenizer):
    with pytest.raises(ValueError):
        weighted_token_chunks(sd1_tokenizer, "x", max_chunks=1, min_chunks=2)


# --- applying weights ------------------------------------------------------------------------


def test_unit_weights_change_nothing():
    hidden = torch.randn(2, 154, 8)
    torch.testing.assert_close(apply_token_weights(hidden, torch.ones(2, 154)), hidden)


def test_weights_scale_positions_and_keep_each_sample_mean():
    hidden = torch.rand(2, 77, 8) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 5] = 2.0
    weights[1, 9] = 0.5
    out = apply_token_weights(hidden, weights)
    torch.testing.assert_close(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)))
    ratio = out / hidden
    torch.testing.assert_close(ratio[0, 5], 2 * ratio[0, 0])
    torch.testing.assert_close(ratio[1, 9], 0.5 * ratio[1, 0])
    assert not torch.equal(out[0], hidden[0])


def test_dtype_kept_and_zero_mean_guarded():
    hidden = torch.ones(1, 4, 2, dtype=torch.float16)
    out = apply_token_weights(hidden, torch.zeros(1, 4))
    assert out.dtype == torch.float16 and not torch.isnan(out).any()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        apply_token_weights(torch.zeros(1, 77, 4), torch.ones(1, 76))
