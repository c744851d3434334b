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

Multi-token facts (the `facts` family, `fact_*`): several people each have one
fact that the tokenizer splits into many pieces, told in varied wording at
random depths in prose; the last line asks for one person's. A policy that
keeps the tokens the question attends to but drops their neighbours returns
the fact with pieces missing ("cobalt-71" for "cobalt-7391"), which
`Sample.partial` detects.
- fact_code     a word joined to four digits (cobalt-7391)
- fact_date     an ISO date (2019-03-14)
- fact_version  a version string (v4.12.7)
- fact_uuid     a UUID fragment (3f9a2c1e-7b4d)
- fact_path     a file path (/srv/data/reports/q3_summary.csv)
- fact_ident    a code identifier (parse_invoice_total)
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

FACT_KINDS = ("code", "date", "version", "uuid", "path", "ident")
FACT_TASKS = tuple(f"fact_{k}" for k in FACT_KINDS)
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "passkey", "vt", "cwe", "fwe") \
    + FACT_TASKS
# names that stand for several tasks on the command line
FAMILIES = {"facts": FACT_TASKS}

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


def expand_tasks(names: list[str]) -> list[str]:
    """Task names from the command line, with families (`facts`) expanded; unknown names are an error."""
    out: list[str] = []
    for name in names:
        if name in FAMILIES:
            out += [t for t in FAMILIES[name] if t not in out]
        elif name in TASKS:
            out += [name] if name not in out else []
        else:
            raise ValueError(f"unknown task '{name}': choose from {', '.join(TASKS + tuple(FAMILIES))}")
    return out


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

    def partial(self, output: str) -> bool:
        """True when a fact came back broken: the output holds its first or last third (or more, at least three
        characters) but not all of it, and is not simply another fact of the document (a wrong answer, not a
        broken one)."""
        low = output.lower()
        others = [o.lower() for o in self.meta.get("facts", [])]
        for e in (x.lower() for x in self.expected):
            if e in low or any(o != e and o in low for o in others):
                continue
            third = max(3, -(-len(e) // 3))
            if any(e[:n] in low or e[-n:] in low for n in range(third, len(e))):
                return True
        return False


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

    if task in FACT_TASKS:
        return _fact_sample(task, rng, sizer, budget, depth)

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


# ---------------------------------------------------------------- multi-token facts

_FIRST = ("Maria", "Tomasz", "Aiko", "Kwame", "Elena", "Rahul", "Sofia", "Jonas", "Priya", "Mateo", "Ingrid",
          "Omar", "Chloe", "Dmitri", "Amara", "Lucas", "Hana", "Felix", "Nadia", "Theo")
_LAST = ("Lopez", "Novak", "Tanaka", "Mensah", "Petrova", "Gupta", "Rossi", "Berg", "Iyer", "Alvarez", "Holm",
         "Haddad", "Dubois", "Volkov", "Okafor", "Silva", "Kim", "Weber", "Karimi", "Fischer")
_DIRS = ("srv", "opt", "home", "var", "data", "mnt")
_SUBDIRS = ("reports", "backups", "models", "exports", "logs", "archive", "configs", "uploads")
_FILES = ("summary", "ledger", "inventory", "payroll", "metrics", "roster", "forecast", "audit")
_EXTS = ("csv", "json", "yaml", "parquet", "txt", "log")
_VERBS_ID = ("parse", "load", "compute", "render", "validate", "merge", "fetch", "encode")
_NOUNS_ID = ("invoice", "ledger", "shipment", "voucher", "tariff", "payload", "receipt", "profile")
_TAILS_ID = ("total", "header", "batch", "index", "checksum", "window", "offset", "digest")

# how each kind is told, asked and named; {who} is the person, {fact} the value
_FACT_TEXT = {
    "code": ("access code", ("{who}'s access code is {fact}.", "The access code given to {who} is {fact}.",
                             "For the archive, {who} was issued the access code {fact}.",
                             "{who} keeps the access code {fact} on a card.")),
    "date": ("start date", ("{who}'s start date is {fact}.", "{who} started on {fact}, according to the records.",
                            "The start date recorded for {who} is {fact}.",
                            "Records show that {who}'s start date was {fact}.")),
    "version": ("release version", ("{who} signed off release version {fact}.",
                                    "The release version {who} approved is {fact}.",
                                    "{who}'s team shipped release version {fact} last spring.",
                                    "According to the log, {who} tagged release version {fact}.")),
    "uuid": ("ticket id", ("{who}'s ticket id is {fact}.", "The ticket id opened by {who} is {fact}.",
                           "{who} filed a report under ticket id {fact}.",
                           "Support assigned {who} the ticket id {fact}.")),
    "path": ("backup path", ("{who}'s backup path is {fact}.", "{who} stores the nightly backup at the path {fact}.",
                             "The backup path configured for {who} is {fact}.",
                             "Everything {who} saves ends up in the backup path {fact}.")),
    "ident": ("function name", ("{who} wrote the function named {fact}.",
                                "The function {who} maintains is called {fact}.",
                                "In the codebase, {who} owns the function {fact}.",
                                "{who}'s favourite function name is {fact}.")),
}
_QUESTIONS = ("What is {who}'s {noun}?", "Which {noun} belongs to {who}? Give it exactly.",
              "Tell me the {noun} of {who}, exactly as written.", "What {noun} does the text give for {who}?")


def _fact_value(kind: str, rng: random.Random) -> str:
    if kind == "code":
        return f"{rng.choice(_KEY_WORDS)}-{rng.randint(1000, 9999)}"
    if kind == "date":
        return f"{rng.randint(1960, 2029)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if kind == "version":
        return f"v{rng.randint(1, 19)}.{rng.randint(0, 40)}.{rng.randint(0, 99)}"
    if kind == "uuid":
        hexd = "0123456789abcdef"
        return "".join(rng.choice(hexd) for _ in range(8)) + "-" + "".join(rng.choice(hexd) for _ in range(4))
    if kind == "path":
        return (f"/{rng.choice(_DIRS)}/{rng.choice(_SUBDIRS)}/{rng.randint(2015, 2029)}/"
                f"{rng.choice(_FILES)}_{rng.randint(1, 99)}.{rng.choice(_EXTS)}")
    return f"{rng.choice(_VERBS_ID)}_{rng.choice(_NOUNS_ID)}_{rng.choice(_TAILS_ID)}"


def _fact_sample(task: str, rng: random.Random, sizer, budget: int, depth: float) -> Sample:
    """Three to five people with one fact each, at random depths; the asked one at `depth`."""
    kind = task[len("fact_"):]
    noun, templates = _FACT_TEXT[kind]
    n = rng.randint(3, 5)
    people = rng.sample([f"{f} {l}" for f in _FIRST for l in _LAST], n)
    facts: list[str] = []
    while len(facts) < n:  # no two facts start alike (two "cobalt-..." codes would test the model, not the cache)
        v = _fact_value(kind, rng)
        if all(re.split(r"[^0-9a-z]+", v.strip("/"))[0] != re.split(r"[^0-9a-z]+", f.strip("/"))[0] for f in facts):
            facts.append(v)
    needles = [rng.choice(templates).format(who=who, fact=fact) for who, fact in zip(people, facts)]
    depths = [depth] + [rng.random() for _ in range(n - 1)]
    ctx = _insert(_haystack(rng, sizer, budget, _prose), needles, depths)
    question = rng.choice(_QUESTIONS).format(who=people[0], noun=noun)
    return Sample(task, ctx, question, "", [facts[0]], depth, {"kind": kind, "people": n, "facts": facts})
