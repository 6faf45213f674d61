"""The project's own seeded toy grammar: subject-verb agreement (SVA), IOI and filler sentences.

Pure Python (no torch). Everything the embedded model is trained on and evaluated with comes from here.

Conventions
-----------
- Tokens are separated by single spaces; punctuation is its own token (``"Then , Mary and John ..."``).
- Capitalisation: every word is lower-case except (a) the first word of a sentence ("The", "Then")
  and (b) proper names ("Mary"). So "The" (sentence-initial) and "the" (elsewhere) are different tokens
  of the word-level tokenizer; both are in its vocabulary.
- Answers are written with a leading space (``" likes"``, ``" Mary"``): one token of the word-level
  tokenizer, and ``prefix + answer`` tokenizes to ``tokens(prefix) + [answer]``.

Hold-out rule
-------------
Each SVA example is identified by the tuple ``(structure, subject lemma, agreeing-verb lemma,
attractor lemma)`` (``-`` when there is no attractor), each IOI example by
``("ioi", sorted name pair, place, object)``. ``is_held_out(key)`` takes the md5 of the
``|``-joined key; keys whose hash is below ``HOLDOUT_FRACTION`` (20 %) are held out. Held-out
combinations never occur in the training corpus (``corpus_sentence`` rejects sentences that contain
one, for every structure the sentence realises) and are the only source of the ``test`` splits; the
``train`` (circuit-discovery) splits use non-held-out combinations only. The rule does not depend on any
seed, so every script agrees on it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------- words

#: (singular, plural) noun pairs used as subjects and attractors.
NOUNS: list[tuple[str, str]] = [
    (s, s + "s")
    for s in [
        "author",
        "pilot",
        "surgeon",
        "farmer",
        "manager",
        "customer",
        "officer",
        "teacher",
        "senator",
        "dancer",
        "athlete",
        "doctor",
        "lawyer",
        "painter",
        "singer",
        "driver",
        "student",
        "banker",
        "guard",
        "minister",
        "executive",
        "actor",
        "clerk",
        "architect",
        "baker",
        "engineer",
        "nurse",
        "pastor",
        "poet",
        "judge",
        "soldier",
        "writer",
        "player",
        "skater",
        "reader",
        "worker",
        "consultant",
        "chef",
        "mechanic",
        "tourist",
    ]
]

#: (singular, plural) verb pairs that agree with the subject of the main clause.
AGREE_VERBS: list[tuple[str, str]] = [
    ("is", "are"),
    ("was", "were"),
    ("has", "have"),
    ("does", "do"),
    ("likes", "like"),
    ("knows", "know"),
    ("sees", "see"),
    ("loves", "love"),
    ("hates", "hate"),
    ("smiles", "smile"),
    ("laughs", "laugh"),
    ("sleeps", "sleep"),
    ("swims", "swim"),
    ("runs", "run"),
    ("writes", "write"),
]

#: (singular, plural) transitive verb pairs used inside relative clauses ("The N that the N2 V2 ...").
RC_VERBS: list[tuple[str, str]] = [
    ("likes", "like"),
    ("knows", "know"),
    ("sees", "see"),
    ("loves", "love"),
    ("hates", "hate"),
    ("admires", "admire"),
    ("helps", "help"),
    ("meets", "meet"),
    ("trusts", "trust"),
]

PREPOSITIONS: list[str] = ["near", "behind", "beside", "with", "by"]
ADJECTIVES: list[str] = [
    "happy",
    "tired",
    "old",
    "young",
    "here",
    "late",
    "brave",
    "tall",
    "smart",
    "kind",
    "busy",
]
BASE_INTRANSITIVE: list[str] = ["smile", "laugh", "sleep", "swim", "run", "know", "care"]

NAMES: list[str] = [
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Sarah",
    "James",
    "Emma",
    "David",
    "Laura",
    "Michael",
    "Anna",
    "Daniel",
    "Kate",
    "Peter",
    "Lisa",
    "Paul",
    "Rachel",
    "Mark",
    "Julia",
    "Tom",
    "Sophie",
    "Adam",
    "Grace",
    "Henry",
    "Clara",
    "Oliver",
    "Nina",
    "Victor",
    "Rose",
    "Simon",
]
PLACES: list[str] = [
    "store",
    "park",
    "school",
    "office",
    "garden",
    "station",
    "market",
    "beach",
    "library",
    "restaurant",
    "hospital",
    "museum",
]
OBJECTS: list[str] = [
    "book",
    "drink",
    "ring",
    "bone",
    "ball",
    "snack",
    "necklace",
    "computer",
    "letter",
    "flower",
    "apple",
    "basketball",
]
FILLER_VERBS_PAST: list[str] = ["walked", "went", "ran", "came"]

STRUCTURES: tuple[str, ...] = ("simple", "nounpp", "within_rc", "rc")
#: Dataset name of each SVA structure (files ``data/<name>_{train,test}.jsonl``).
DATASET_NAMES: dict[str, str] = {
    "simple": "sva_simple",
    "nounpp": "sva_nounpp",
    "within_rc": "sva_within_rc",
    "rc": "sva_rc",
}

HOLDOUT_FRACTION = 0.2

_V_SG = {s: (s, p) for s, p in AGREE_VERBS + RC_VERBS}
_V_PL = {p: (s, p) for s, p in AGREE_VERBS + RC_VERBS}


def vocabulary() -> list[str]:
    """Every token any generator of this module can produce (sorted, deterministic)."""
    words: set[str] = {"The", "the", "that", "Then", "and", "went", "to", "gave", "a", "not", ",", "."}
    for s, p in NOUNS + AGREE_VERBS + RC_VERBS:
        words.update((s, p))
    words.update(PREPOSITIONS + ADJECTIVES + BASE_INTRANSITIVE + NAMES + PLACES + OBJECTS + FILLER_VERBS_PAST)
    return sorted(words)


@dataclass(frozen=True)
class Lexicon:
    """The words the pair generators draw from. The default is this module's full word lists (what
    the shipped files are made of); :mod:`feature_circuits.tasks` passes the subset a tokenizer can
    express. Each field keeps the order of the module list it restricts, so the seeded draws of the
    default lexicon are exactly those of the shipped files."""

    nouns: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(NOUNS))
    agree_verbs: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(AGREE_VERBS))
    rc_verbs: tuple[tuple[str, str], ...] = field(default_factory=lambda: tuple(RC_VERBS))
    prepositions: tuple[str, ...] = field(default_factory=lambda: tuple(PREPOSITIONS))
    names: tuple[str, ...] = field(default_factory=lambda: tuple(NAMES))
    places: tuple[str, ...] = field(default_factory=lambda: tuple(PLACES))
    objects: tuple[str, ...] = field(default_factory=lambda: tuple(OBJECTS))


# -------------------------------------------------------------------------------------------- hold-out


def is_held_out(key: tuple[str, ...]) -> bool:
    """Deterministic hold-out rule: md5 of the ``|``-joined key, ~HOLDOUT_FRACTION of keys held out."""
    h = int(hashlib.md5("|".join(key).encode()).hexdigest()[:8], 16)
    return h / 2**32 < HOLDOUT_FRACTION


def sva_key(structure: str, subject: str, verb: str, attractor: str | None = None) -> tuple[str, ...]:
    """Hold-out key of one SVA combination; nouns/verbs may be given in either number (lemmatised)."""
    return (structure, _noun_lemma(subject), _verb_lemma(verb), _noun_lemma(attractor) if attractor else "-")


def ioi_key(name_a: str, name_b: str, place: str, obj: str) -> tuple[str, ...]:
    """Hold-out key of one IOI combination (symmetric in the two names, so a name swap keeps the key)."""
    x, y = sorted((name_a, name_b))
    return ("ioi", x, y, place, obj)


def _noun_lemma(noun: str) -> str:
    for s, p in NOUNS:
        if noun in (s, p):
            return s
    raise ValueError(f"unknown noun {noun!r}")


def _verb_lemma(verb: str) -> str:
    if verb in _V_SG:
        return verb
    if verb in _V_PL:
        return _V_PL[verb][0]
    raise ValueError(f"unknown verb {verb!r}")


def noun_form(pair: tuple[str, str], plural: bool) -> str:
    return pair[1] if plural else pair[0]


def verb_form(pair: tuple[str, str], plural: bool) -> str:
    return pair[1] if plural else pair[0]


# ----------------------------------------------------------------------------------------- SVA pairs


def sva_prefix(structure: str, subject: str, attractor: str | None = None, rc_verb: str | None = None) -> str:
    """The prefix of an SVA sentence up to (not including) the verb being predicted.

    simple: "The N"; nounpp: "The N near the N2" (``rc_verb`` is then the preposition, default "near");
    within_rc: "The N that the N2"; rc: "The N that the N2 V2" (``rc_verb`` is V2, already agreeing with N2).
    """
    if structure == "simple":
        return f"The {subject}"
    if structure == "nounpp":
        return f"The {subject} {rc_verb or 'near'} the {attractor}"
    if structure == "within_rc":
        return f"The {subject} that the {attractor}"
    if structure == "rc":
        if rc_verb is None:
            raise ValueError("structure 'rc' needs rc_verb")
        return f"The {subject} that the {attractor} {rc_verb}"
    raise ValueError(f"unknown structure {structure!r}")


def make_sva_pair(
    structure: str,
    noun: tuple[str, str],
    verb: tuple[str, str],
    *,
    plural: bool,
    attractor: tuple[str, str] | None = None,
    attractor_plural: bool = False,
    other_verb: tuple[str, str] | None = None,
    preposition: str = "near",
) -> dict:
    """One clean/patch SVA pair (the dataset schema of docs/algorithms.md, "Datasets").

    ``noun``/``verb`` are (singular, plural) pairs. For simple/nounpp/rc the varied noun is the subject
    ``noun`` and ``verb`` agrees with it; ``attractor`` is the distractor noun (nounpp, rc) and, for rc,
    ``other_verb`` is the relative-clause verb (agreeing with the attractor). For within_rc the varied
    noun is ``attractor`` (the RC subject) and ``verb`` is the RC verb agreeing with it; ``noun`` is the
    head noun (number ``plural``, fixed across clean/patch). ``attractor_plural`` is the attractor's number.
    The clean example uses the given numbers; the patch flips the number of the varied noun.
    """

    def build(subj_pl: bool, attr_pl: bool) -> str:
        subj = noun_form(noun, subj_pl)
        attr = noun_form(attractor, attr_pl) if attractor else None
        if structure == "nounpp":
            return sva_prefix(structure, subj, attr, preposition)
        if structure == "rc":
            if other_verb is None:
                raise ValueError("make_sva_pair: structure 'rc' needs other_verb (the relative-clause verb)")
            return sva_prefix(structure, subj, attr, verb_form(other_verb, attr_pl))
        return sva_prefix(structure, subj, attr)

    if structure == "within_rc":
        clean = build(plural, attractor_plural)
        patch = build(plural, not attractor_plural)
        ca, pa = verb_form(verb, attractor_plural), verb_form(verb, not attractor_plural)
        case = f"{'pl' if plural else 'sg'}_{'pl' if attractor_plural else 'sg'}"
    else:
        clean = build(plural, attractor_plural)
        patch = build(not plural, attractor_plural)
        ca, pa = verb_form(verb, plural), verb_form(verb, not plural)
        case = f"{'pl' if plural else 'sg'}" + (f"_{'pl' if attractor_plural else 'sg'}" if attractor else "")
    return {
        "clean_prefix": clean,
        "patch_prefix": patch,
        "clean_answer": " " + ca,
        "patch_answer": " " + pa,
        "case": case,
    }


def _sample_sva(structure: str, rng: random.Random, lex: Lexicon) -> tuple[dict, tuple[str, ...]]:
    noun = rng.choice(lex.nouns)
    plural = rng.random() < 0.5
    attractor = None
    attr_pl = rng.random() < 0.5
    other = None
    prep = rng.choice(lex.prepositions)
    if structure == "simple":
        verb = rng.choice(lex.agree_verbs)
        key = sva_key(structure, noun[0], verb[0])
    else:
        attractor = rng.choice([n for n in lex.nouns if n != noun])
        if structure == "within_rc":
            verb = rng.choice(lex.rc_verbs)
            key = sva_key(structure, attractor[0], verb[0], noun[0])
        else:
            verb = rng.choice(lex.agree_verbs)
            key = sva_key(structure, noun[0], verb[0], attractor[0])
            if structure == "rc":
                other = rng.choice(lex.rc_verbs)
    ex = make_sva_pair(
        structure,
        noun,
        verb,
        plural=plural,
        attractor=attractor,
        attractor_plural=attr_pl,
        other_verb=other,
        preposition=prep,
    )
    return ex, key


def _max_tries(n: int) -> int:
    return 200 * n + 10000


#: Non-strict generators stop after this many draws in a row without a new distinct candidate.
_STALE_DRAWS = 20000


def generate_sva_pairs(
    structure: str,
    n: int,
    split: str,
    seed: int = 0,
    *,
    lexicon: Lexicon | None = None,
    strict: bool = True,
) -> list[dict]:
    """``n`` distinct SVA pairs of ``structure``; ``split='test'`` draws held-out combinations only,
    ``split='train'`` non-held-out ones. Balanced over the clean-example number cases by random sampling.

    ``lexicon`` restricts the words (default: all of this module's). After ``200 n + 10000`` draws
    without reaching ``n`` pairs ``strict`` raises :class:`RuntimeError`; otherwise (``strict=False``)
    the pairs found so far are returned, already after ``20000`` draws in a row that found no new
    pair (the words admit no more). The first ``m`` pairs do not depend on ``n >= m``."""
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}")
    want_held = _split_flag(split)
    lex = Lexicon() if lexicon is None else lexicon
    rng = random.Random(f"sva|{structure}|{split}|{seed}")
    out, seen = [], set()
    tries = stale = 0
    while len(out) < n:
        tries += 1
        stale += 1
        if tries > _max_tries(n) or (not strict and stale > _STALE_DRAWS):
            if not strict:
                break
            raise RuntimeError(f"could not draw {n} distinct {structure} pairs for split {split}")
        ex, key = _sample_sva(structure, rng, lex)
        if is_held_out(key) != want_held:
            continue
        sig = (ex["clean_prefix"], ex["clean_answer"])
        if sig in seen:
            continue
        seen.add(sig)
        stale = 0
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------- IOI pairs


def ioi_prefix(subject: str, indirect: str, place: str, obj: str, subject_first: bool = True) -> str:
    """ "Then , B and A went to the PLACE . B gave a OBJECT to" with B=subject, A=indirect object
    (``subject_first=False`` mentions A first: "Then , A and B went ...")."""
    first, second = (subject, indirect) if subject_first else (indirect, subject)
    return f"Then , {first} and {second} went to the {place} . {subject} gave a {obj} to"


def make_ioi_pair(subject: str, indirect: str, place: str, obj: str) -> dict:
    """Clean "Then , B and A went to the PLACE . B gave a OBJECT to" -> " A"; the patch swaps the two
    names everywhere (-> " B"). Metric: logit(clean_answer) - logit(patch_answer)."""
    return {
        "clean_prefix": ioi_prefix(subject, indirect, place, obj),
        "patch_prefix": ioi_prefix(indirect, subject, place, obj),
        "clean_answer": " " + indirect,
        "patch_answer": " " + subject,
        "case": "BABA",
    }


def generate_ioi_pairs(
    n: int,
    split: str,
    seed: int = 0,
    *,
    lexicon: Lexicon | None = None,
    strict: bool = True,
) -> list[dict]:
    """``n`` distinct IOI pairs (held-out combinations for ``split='test'``, others for 'train');
    ``lexicon`` and ``strict`` as in :func:`generate_sva_pairs`."""
    want_held = _split_flag(split)
    lex = Lexicon() if lexicon is None else lexicon
    if len(lex.names) < 2:
        raise ValueError(f"IOI needs at least two names, got {list(lex.names)}")
    rng = random.Random(f"ioi|{split}|{seed}")
    out, seen = [], set()
    tries = stale = 0
    while len(out) < n:
        tries += 1
        stale += 1
        if tries > _max_tries(n) or (not strict and stale > _STALE_DRAWS):
            if not strict:
                break
            raise RuntimeError(f"could not draw {n} distinct ioi pairs for split {split}")
        b, a = rng.sample(lex.names, 2)
        place, obj = rng.choice(lex.places), rng.choice(lex.objects)
        if is_held_out(ioi_key(a, b, place, obj)) != want_held or (b, a, place, obj) in seen:
            continue
        seen.add((b, a, place, obj))
        stale = 0
        out.append(make_ioi_pair(b, a, place, obj))
    return out


def _split_flag(split: str) -> bool:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split == "test"


# ------------------------------------------------------------------------------------ training corpus


@dataclass(frozen=True)
class CorpusSentence:
    """A training sentence (space-separated tokens, ending in ".") and the token indices whose
    prediction is the point of the sentence (agreeing verbs, the IOI indirect object), to upweight."""

    text: str
    targets: tuple[int, ...]
    kind: str


def _continuation(verb: str, rng: random.Random) -> list[str]:
    s = _verb_lemma(verb)
    if s in ("is", "was"):
        return [rng.choice(ADJECTIVES)]
    if s == "has":
        return ["a", rng.choice(OBJECTS)]
    if s == "does":
        return ["not", rng.choice(BASE_INTRANSITIVE)]
    if s in ("likes", "knows", "sees", "loves", "hates", "writes"):
        return ["the", rng.choice(rng.choice(NOUNS))] if s != "writes" else ["a", "letter"]
    return []  # intransitive: smiles, laughs, sleeps, swims, runs


def _sva_sentence(structure: str, rng: random.Random) -> CorpusSentence | None:
    noun, attractor = rng.sample(NOUNS, 2)
    pl, apl = rng.random() < 0.5, rng.random() < 0.5
    verb = rng.choice(AGREE_VERBS)
    subj = noun_form(noun, pl)
    v = verb_form(verb, pl)
    if structure == "simple":
        if is_held_out(sva_key("simple", noun[0], verb[0])):
            return None
        toks = ["The", subj, v]
        targets = (2,)
    elif structure == "nounpp":
        if is_held_out(sva_key("nounpp", noun[0], verb[0], attractor[0])):
            return None
        toks = ["The", subj, rng.choice(PREPOSITIONS), "the", noun_form(attractor, apl), v]
        targets = (5,)
    else:  # one relative-clause sentence realises both the within_rc and the rc structure
        rcv = rng.choice(RC_VERBS)
        if is_held_out(sva_key("rc", noun[0], verb[0], attractor[0])) or is_held_out(
            sva_key("within_rc", attractor[0], rcv[0], noun[0])
        ):
            return None
        toks = ["The", subj, "that", "the", noun_form(attractor, apl), verb_form(rcv, apl), v]
        targets = (5, 6)
    toks += [*_continuation(v, rng), "."]
    return CorpusSentence(" ".join(toks), targets, structure)


def _ioi_sentence(rng: random.Random) -> CorpusSentence | None:
    b, a = rng.sample(NAMES, 2)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    if is_held_out(ioi_key(a, b, place, obj)):
        return None
    subject_first = rng.random() < 0.5  # both orders, so "the second name" is not a shortcut
    text = ioi_prefix(b, a, place, obj, subject_first) + f" {a} ."
    n = len(text.split())
    return CorpusSentence(text, (n - 2,), "ioi")


def _filler_sentence(rng: random.Random) -> CorpusSentence:
    r = rng.random()
    if r < 0.3:
        toks = [
            "The",
            rng.choice(rng.choice(NOUNS)),
            rng.choice(FILLER_VERBS_PAST),
            "to",
            "the",
            rng.choice(PLACES),
        ]
    elif r < 0.6:
        toks = [rng.choice(NAMES), "went", "to", "the", rng.choice(PLACES)]
    elif r < 0.8:
        toks = [
            rng.choice(NAMES),
            "gave",
            "a",
            rng.choice(OBJECTS),
            "to",
            "the",
            rng.choice(rng.choice(NOUNS)),
        ]
    else:
        a, b = rng.sample(NAMES, 2)
        toks = [a, "and", b, rng.choice(FILLER_VERBS_PAST), "to", "the", rng.choice(PLACES)]
    return CorpusSentence(" ".join([*toks, "."]), (), "filler")


#: Default mixture of the training corpus.
CORPUS_MIX: dict[str, float] = {"simple": 0.12, "nounpp": 0.2, "rc": 0.28, "ioi": 0.3, "filler": 0.1}


def corpus_sentence(rng: random.Random, mix: dict[str, float] | None = None) -> CorpusSentence:
    """One training sentence drawn from ``mix`` (default ``CORPUS_MIX``); never contains a held-out
    combination."""
    mix = mix or CORPUS_MIX
    kinds, weights = zip(*mix.items(), strict=True)
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "ioi":
            s = _ioi_sentence(rng)
        elif kind == "filler":
            s = _filler_sentence(rng)
        else:
            s = _sva_sentence(kind, rng)
        if s is not None:
            return s


def generate_corpus(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[CorpusSentence]:
    """``n`` training sentences, deterministic in ``seed``."""
    rng = random.Random(f"corpus|{seed}")
    return [corpus_sentence(rng, mix) for _ in range(n)]
