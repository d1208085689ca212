"""A deterministic synthetic training corpus for the tiny models' tokenizer.

The tokenizer only has to look like a real one (a few hundred merges of
common English, numbers, code and JSON), so the text is generated here from an
embedded word list with a seeded `random.Random`. Nothing is read from the
machine, so every machine trains the same tokenizer.
"""

from __future__ import annotations

import random

WORDS = """
the of and to a in is it you that he was for on are with as I his they be at
one have this from or had by hot word but what some we can out other were all
there when up use your how said an each she which do their time if will way
about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take
get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say
help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change
went light kind off need house picture try us again animal point mother world
near build self earth father head stand own page should country found answer
school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea
draw left late run while press close night real life few north open seem
together next white children begin got walk example ease paper group always
music those both mark often letter until mile river car feet care second book
carry took science eat room friend began idea fish mountain stop once base hear
horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since
top whole king space heard best hour better true during hundred five remember
step early hold west ground interest reach fast verb sing listen six table
travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice
voice unit power town fine certain fly fall lead cry dark machine note wait plan
figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green quick develop ocean warm free minute
strong special mind behind clear tail produce fact street inch multiply nothing
course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane dry wonder laugh
thousand ago ran check game shape equate miss brought heat snow tire bring yes
distant fill east paint language among weather tool function search result
server request response cache token model prompt answer reason think
""".split()

PUNCTUATION = [".", ",", "!", "?", ";", ":", " -", "..."]

NAMES = ["Alice", "Bob", "Paris", "London", "Tokyo", "Berlin", "Monday", "July"]

UNICODE_SNIPPETS = [
    "café", "naïve", "Zürich", "façade", "résumé", "São Paulo", "東京", "日本語",
    "привет", "γειά", "emoji 😀", "→ ✓ ★", "°C", "€10", "—",
]

CODE_TEMPLATES = [
    "def {a}({b}):\n    return {b} + {n}\n",
    "for {a} in range({n}):\n    print({a}, {b})\n",
    "if ({a} == {n}) {{\n  return {b};\n}}\n",
    "const {a} = [{n}, {m}, {n}];\n",
    "class {A}:\n    def __init__(self, {b}):\n        self.{b} = {b}\n",
    "{a} = {{\"{b}\": {n}, \"ok\": true}}\n",
    '{{"name": "{a}", "arguments": {{"{b}": "{c}", "count": {n}}}}}\n',
    "import {a}\nfrom {b} import {c}\n",
    "SELECT {a}, {b} FROM {c} WHERE id = {n};\n",
    "$ {a} --{b}={n} ./{c}.txt\n",
]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(NAMES))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), rng.choice(UNICODE_SNIPPETS))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(PUNCTUATION)


def _numbers(rng: random.Random) -> str:
    kinds = [
        lambda: str(rng.randint(0, 99999)),
        lambda: f"{rng.randint(0, 999)}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        lambda: f"{rng.randint(1, 100)}%",
    ]
    return " ".join(rng.choice(kinds)() for _ in range(rng.randint(1, 6)))


def _code(rng: random.Random) -> str:
    a, b, c = (rng.choice(WORDS) for _ in range(3))
    n, m = rng.randint(0, 999), rng.randint(0, 99)
    return rng.choice(CODE_TEMPLATES).format(a=a, b=b, c=c, A=a.capitalize(), n=n, m=m)


def corpus(lines: int = 6000, seed: int = 1234) -> list[str]:
    """Mostly prose, with numbers and code-like snippets mixed in."""
    rng = random.Random(seed)
    makers = [_sentence] * 6 + [_numbers] * 2 + [_code] * 2
    return [rng.choice(makers)(rng) for _ in range(lines)]
