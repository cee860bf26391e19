"""hub_models.headline: the one rule that turns the selected detectors' verdicts into one headline, every branch."""

import pytest

from hub_models import headline as hl
from hub_models import modeling_bayesfake
from hub_models.headline import VERDICT_FAKE, VERDICT_OUTSIDE, VERDICT_REAL, VERDICT_UNSURE, headline


def test_the_verdicts_are_the_models_own_strings():
    assert hl.VERDICTS == modeling_bayesfake.VERDICTS
    assert (VERDICT_FAKE, VERDICT_REAL, VERDICT_UNSURE, VERDICT_OUTSIDE) == modeling_bayesfake.VERDICTS


def test_one_detector_answering_is_the_answer():
    h = headline({"a": VERDICT_FAKE})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_FAKE, ["a"], [], [])
    assert h.explanation == "Likely AI-generated: a answered."


def test_agreeing_detectors_give_their_answer_and_abstentions_do_not_override_it():
    h = headline({"a": VERDICT_REAL, "b": VERDICT_UNSURE, "c": VERDICT_REAL})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_REAL, ["a", "c"], ["b"], [])
    assert h.explanation == "Likely real: both detectors that answered agree (a and c); b was unsure."
    three = headline({"a": VERDICT_FAKE, "b": VERDICT_FAKE, "c": VERDICT_FAKE})
    assert three.explanation == "Likely AI-generated: all 3 detectors that answered agree (a, b and c)."


def test_detectors_outside_their_domain_do_not_count():
    h = headline({"a": VERDICT_OUTSIDE, "b": VERDICT_REAL, "c": VERDICT_OUTSIDE})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_REAL, ["b"], [], ["a", "c"])
    assert h.explanation == ("Likely real: b answered; a and c cannot judge it (the image is outside what they were "
                             "trained on).")


def test_a_disagreement_is_uncertain_whatever_the_majority():
    h = headline({"a": VERDICT_FAKE, "b": VERDICT_FAKE, "c": VERDICT_REAL, "d": VERDICT_OUTSIDE})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_UNSURE, ["a", "b", "c"], [], ["d"])
    assert h.explanation.startswith("Uncertain, needs human review: the detectors that answered disagree (a: likely "
                                    "AI-generated; b: likely AI-generated; c: likely real), so at least one of them "
                                    "is wrong; d cannot judge it")


def test_every_in_domain_detector_abstaining_is_uncertain():
    h = headline({"a": VERDICT_UNSURE, "b": VERDICT_OUTSIDE})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_UNSURE, [], ["a"], ["b"])
    assert h.explanation == ("Uncertain, needs human review: the only detector that could judge this image was unsure "
                             "(a); b cannot judge it (the image is outside what it was trained on).")
    both = headline({"a": VERDICT_UNSURE, "b": VERDICT_UNSURE})
    assert both.verdict == VERDICT_UNSURE and both.abstained == ["a", "b"]
    assert "all 2 detectors that could judge this image were unsure (a and b)" in both.explanation


def test_no_detector_in_its_domain_gives_no_verdict():
    h = headline({"a": VERDICT_OUTSIDE})
    assert (h.verdict, h.answered, h.abstained, h.outside) == (VERDICT_OUTSIDE, [], [], ["a"])
    assert h.explanation == "No verdict: the image is outside what the selected detector was trained on (a), so none " \
                            "can judge it."
    two = headline({"org/a": VERDICT_OUTSIDE, "org/b": VERDICT_OUTSIDE}, label=lambda n: n.split("/")[-1])
    assert two.outside == ["org/a", "org/b"]  # the lists keep the names; the sentence uses the labels
    assert "selected detectors were trained on (a and b)" in two.explanation


def test_the_dict_form_has_every_field():
    assert headline({"a": VERDICT_REAL}).to_dict() == {
        "verdict": VERDICT_REAL, "answered": ["a"], "abstained": [], "outside": [],
        "explanation": "Likely real: a answered."}


@pytest.mark.parametrize("answers, message", [({}, "no detector"), ({"a": "probably fake"}, "not a detector verdict")])
def test_bad_input_is_refused(answers, message):
    with pytest.raises(ValueError, match=message):
        headline(answers)
