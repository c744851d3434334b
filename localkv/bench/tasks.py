"""Seeded synthetic long-context tasks, RULER-style, sized with the model's tokenizer. No download.

Every task yields Samples: a context (the long document), a question, an answer
prefix the model continues, and the expected strings. Scoring is RULER's string
match: the fraction of expected strings found in the output (case-insensitive).

- niah_single   one "special magic number" for a key, hidden at a given depth
- niah_multikey several keys with numbers; one is asked
- niah_multivalue one key with several numbers; all are asked
- niah_multiquery several keys; several are asked
- passkey       llama.cpp's passkey test: a 5-digit key in repetitive filler
- vt            variable tracking: chains of assignments; which variables hold a value
- cwe           common words extraction: the 10 most repeated words of a list
- fwe           frequent words extraction: the 3 most frequent coded words
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe")

# haystack prose: varied, neutral sentences (not the repeated "grass is green" only, which makes retrieval trivial)
_SUBJECTS = ("The old harbour", "A quiet village", "The northern forest", "The river delta", "A mountain pass",
             "The city library", "An abandoned mill", "The coastal road", "A desert oasis", "The market square",
             "The observatory", "A fishing boat", "The railway station", "A walled garden", "The university")
_VERBS = ("was rebuilt after", "became famous for", "slowly changed during", "was often visited in",
          "was painted many times during", "suffered badly in", "grew quiet after", "was celebrated in")
_OBJECTS = ("the long winter", "the spring floods", "the harvest festival", "the years of the great trade",
            "the summer storms", "the autumn fairs", "the reign of the last duke", "the arrival of the railway")
_TAILS = ("Travellers still talk about it.", "Few records of that time survive.", "Its bells could be heard for miles.",
          "Local families kept careful diaries.", "Merchants came from distant towns.", "Children played along its paths.",
          "The weather there was rarely kind.", "Painters loved its evening light.")

_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

_KEY_WORDS = ("amber", "falcon", "cobalt", "harbor", "juniper", "lantern", "meadow", "nimbus", "orchid", "quartz",
              "raven", "saffron", "tundra", "umber", "willow", "zephyr", "basalt", "cedar", "dune", "ember")

_COMMON_POOL = ("apple", "bridge", "candle", "dragon", "engine", "feather", "garden", "helmet", "island", "jacket",
                "kettle", "ladder", "mirror", "needle", "orange", "pencil", "rabbit", "saddle", "tunnel", "violin",
                "wallet", "yogurt", "anchor", "basket", "carpet", "dolphin", "elbow", "forest", "guitar", "hammer",
                "insect", "jungle", "lemon", "magnet", "napkin", "oyster", "parrot", "rocket", "spider", "tomato")


@dataclass
class Sample:
    task: str
    context: str
    question: str
    answer_prefix: str
    expected: list[str]
    depth: float = 0.0
    meta: dict = field(default_factory=dict)

    def score(self, output: str) -> float:
        low = output.lower()
        return sum(e.lower() in low for e in self.expected) / len(self.expected)


class _Sizer:
    """Counts tokens with the model's tokenizer (cached per sentence)."""

    def __init__(self, tokenize):
        self.tokenize = tokenize
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = len(self.tokenize(text))
            if len(text) < 400:
                self._cache[text] = n
        return n


def _prose(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}. {rng.choice(_TAILS)} "


def _haystack(rng, sizer, n_tokens: int, sentence) -> list[str]:
    """Sentences adding up to about n_tokens."""
    out, total = [], 0
    while total < n_tokens:
        s = sentence(rng)
        out.append(s)
        total += sizer(s)
    return out


def _insert(sentences: list[str], needles: list[str], depths: list[float]) -> str:
    parts = list(sentences)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: -x[1]):
        i = int(round(depth * len(parts)))
        parts.insert(i, needle + " ")
    return "".join(parts)


def _number(rng) -> str:
    return str(rng.randint(1000000, 9999999))


def _key(rng, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_KEY_WORDS)}-{rng.randint(10, 99)}"
        if k not in used:
            used.add(k)
            return k


def make_sample(task: str, length: int, depth: float, seed: int, tokenize) -> Sample:
    """One sample of `task` whose context is about `length` tokens, with its needle(s) at `depth` in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{length}:{depth}:{seed}")
    sizer = _Sizer(tokenize)
    budget = max(length - 120, 64)  # room for question and template
    used: set[str] = set()

    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        hay = _haystack(rng, sizer, budget, lambda r: _PASSKEY_FILLER)
        ctx = _insert(hay, [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth])
        return Sample(task, "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                      + ctx, "What is the pass key?", "The pass key is", [key], depth)

    if task.startswith("niah"):
        n_keys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
        n_values = 4 if task == "niah_multivalue" else 1
        keys = [_key(rng, used) for _ in range(n_keys)]
        values = {k: [_number(rng) for _ in range(n_values)] for k in keys}
        needles, depths = [], []
        for i, k in enumerate(keys):
            for v in values[k]:
                needles.append(f"One of the special magic numbers for {k} is: {v}.")
                # the asked key sits at `depth`; distractors and extra values spread around it
                depths.append(depth if (i == 0 and len(depths) == 0) else rng.random())
        hay = _haystack(rng, sizer, budget, _prose)
        ctx = _insert(hay, needles, depths)
        if task == "niah_multiquery":
            asked = keys[:2]
            q = f"What are the special magic numbers for {asked[0]} and {asked[1]} mentioned in the provided text?"
            exp = [values[asked[0]][0], values[asked[1]][0]]
            prefix = f"The special magic numbers for {asked[0]} and {asked[1]} mentioned in the provided text are"
        elif task == "niah_multivalue":
            q = f"What are all the special magic numbers for {keys[0]} mentioned in the provided text?"
            exp = values[keys[0]]
            prefix = f"The special magic numbers for {keys[0]} mentioned in the provided text are"
        else:
            q = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
            exp = values[keys[0]]
            prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
        return Sample(task, ctx, q, prefix, exp, depth)

    if task == "vt":
        value = str(rng.randint(10000, 99999))
        names = [f"{''.join(rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ') for _ in range(4))}" for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        hay = _haystack(rng, sizer, budget, _prose)
        depths = sorted(min(1.0, max(0.0, depth + (i - 2) * 0.08)) for i in range(5))
        ctx = _insert(hay, chain, depths)
        return Sample(task, "Memorize and track the chain(s) of variable assignment hidden in the following text. "
                      + ctx, f"Find all variables that are assigned the value {value} in the text above.",
                      f"Answer: According to the chain(s) of variable assignment in the text above, 5 variables "
                      f"are assigned the value {value}, they are:", names, depth)

    if task == "cwe":
        pool = list(_COMMON_POOL)
        rng.shuffle(pool)
        common, rare = pool[:10], pool[10:]
        words: list[str] = []
        total = 0
        while total < budget:
            batch = common * 3 + rng.sample(rare, 10)
            rng.shuffle(batch)
            chunk = " ".join(f"{len(words) + i + 1}. {w}" for i, w in enumerate(batch)) + " "
            words += batch
            total += sizer(chunk)
        ctx = "Below is a numbered list of words. In these words, some appear more often than others. " + \
            " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return Sample(task, ctx, "What are the 10 most common words in the above list?",
                      "Answer: The top 10 words that appear most often in the list are:", common, depth)

    # fwe: coded words with Zipf frequencies
    vocab = [f"{''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(5))}" for _ in range(60)]
    weights = [1 / (i + 1) ** 1.3 for i in range(len(vocab))]
    text_words: list[str] = []
    total = 0
    while total < budget:
        batch = rng.choices(vocab, weights=weights, k=40)
        text_words += batch
        total += sizer(" ".join(batch) + " ")
    counts = {w: text_words.count(w) for w in vocab}
    top = sorted(vocab, key=lambda w: -counts[w])[:3]
    ctx = "Read the following coded text and track the frequency of each coded word. " + " ".join(text_words)
    return Sample(task, ctx, "What are the three most frequently appeared words in the above coded text?",
                  "Answer: According to the coded text above, the three most frequently appeared words are:", top, depth)
