"""One answer from several detectors: the rule that turns the selected detectors' verdicts into one headline.

The rule, in order:

1. A detector whose domain gate says the image is unlike its training data ("outside what this detector was trained
   on: no verdict") does not count: it cannot judge the image, so it neither supports nor contradicts the others.
2. If no selected detector is in its domain, there is no verdict (``VERDICT_OUTSIDE``): the image is outside what the
   selected detectors were trained on.
3. Of the detectors in their domain, those that said "uncertain: needs human review" abstained. If every one of them
   abstained, the headline is uncertain.
4. Otherwise the headline is "likely AI-generated" or "likely real" only when every detector that answered agrees. If
   the answering detectors disagree, the headline is "uncertain: needs human review".

Why: each detector's answered verdicts carry a certified error bound (its reject rule is chosen so that, with
probability at least 1 - delta, at most alpha of the in-domain images it answers are wrong; ``config.abstention``).
When two of them give opposite answers, at least one of the two is wrong on this image, and nothing here says which,
so the honest headline is "ask a human". When they agree, the headline inherits the bound of any one of them: it is
wrong only if every one of them is. An abstention is not a vote either way, so it never overrides an answer, and a
detector judging an image unlike its training data has no bound at all, so it is left out.

Pure: verdict strings in, a ``Headline`` out, no torch, no model. The Space (``space/``) and ``bayesfake score`` both
call ``headline``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

# The four verdicts of ``modeling_bayesfake.VERDICTS``, spelt out here so that this module needs no torch; a test
# checks that they are the model's own strings.
VERDICT_FAKE = "likely AI-generated"
VERDICT_REAL = "likely real"
VERDICT_UNSURE = "uncertain: needs human review"
VERDICT_OUTSIDE = "outside what this detector was trained on: no verdict"
VERDICTS = (VERDICT_FAKE, VERDICT_REAL, VERDICT_UNSURE, VERDICT_OUTSIDE)
ANSWERS = (VERDICT_FAKE, VERDICT_REAL)


@dataclass(frozen=True)
class Headline:
    """The combined answer. ``verdict`` is one of ``VERDICTS`` (``VERDICT_OUTSIDE`` here means that no selected
    detector is in its domain); ``answered``, ``abstained`` and ``outside`` name the detectors that gave "likely ...",
    said uncertain, and were refused by their domain gate, in the order given; ``explanation`` is one plain
    sentence."""

    verdict: str
    answered: list[str] = field(default_factory=list)
    abstained: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    explanation: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def names_text(names: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def headline(answers: Mapping[str, str], label: Callable[[str], str] | None = None) -> Headline:
    """Combine ``answers`` (detector name -> its verdict, one of ``VERDICTS``) into one ``Headline`` by the rule of the
    module docstring. ``label`` shortens a name for the explanation (e.g. a repo id to its last part); the lists keep
    the names as given. ``ValueError`` for no answers or a verdict that is not one of the four."""
    if not answers:
        raise ValueError("headline: no detector answered (select at least one)")
    unknown = {name: verdict for name, verdict in answers.items() if verdict not in VERDICTS}
    if unknown:
        raise ValueError(f"headline: not a detector verdict: {unknown!r} (expected one of {list(VERDICTS)})")
    label = label or (lambda name: name)
    answered = [name for name, verdict in answers.items() if verdict in ANSWERS]
    abstained = [name for name, verdict in answers.items() if verdict == VERDICT_UNSURE]
    outside = [name for name, verdict in answers.items() if verdict == VERDICT_OUTSIDE]
    said = {answers[name] for name in answered}

    def clause(names: list[str], one: str, many: str) -> str:
        return f"{names_text([label(n) for n in names])} {one if len(names) == 1 else many}"

    # What the detectors that did not answer did, and why: appended to the sentence so that it stays one sentence.
    notes = []
    if abstained and answered:
        notes.append(clause(abstained, "was unsure", "were unsure"))
    if outside:
        notes.append(clause(outside, "cannot judge it (the image is outside what it was trained on)",
                            "cannot judge it (the image is outside what they were trained on)"))
    tail = f"; {'; '.join(notes)}" if notes else ""

    if not answered and not abstained:
        verdict = VERDICT_OUTSIDE
        text = (f"No verdict: the image is outside what the selected detector{'s were' if len(outside) > 1 else ' was'}"
                f" trained on ({names_text([label(n) for n in outside])}), so none can judge it.")
    elif not answered:
        verdict = VERDICT_UNSURE
        who = ("the only detector that could judge this image was unsure" if len(abstained) == 1 else
               f"all {len(abstained)} detectors that could judge this image were unsure")
        text = f"Uncertain, needs human review: {who} ({names_text([label(n) for n in abstained])}){tail}."
    elif len(said) > 1:
        verdict = VERDICT_UNSURE
        split = "; ".join(f"{label(n)}: {answers[n]}" for n in answered)
        text = (f"Uncertain, needs human review: the detectors that answered disagree ({split}), so at least one of "
                f"them is wrong{tail}.")
    else:
        verdict = said.pop()
        who = (f"{label(answered[0])} answered" if len(answered) == 1 else
               f"both detectors that answered agree ({names_text([label(n) for n in answered])})" if len(answered) == 2
               else f"all {len(answered)} detectors that answered agree ({names_text([label(n) for n in answered])})")
        text = f"{verdict[0].upper()}{verdict[1:]}: {who}{tail}."
    return Headline(verdict, answered, abstained, outside, text)
