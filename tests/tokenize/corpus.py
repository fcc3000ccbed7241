"""A deterministic corpus of varied strings for tokenizer parity tests and benchmarks."""

from __future__ import annotations

import random

_WORDS = (
    "the quick brown fox jumps over lazy dog hello world meeting notes model inference edge "
    "device token tokenizer OpenVINO don't it's we'll I'm café naïve résumé façade Zürich "
    "Straße ΑΣ Σίσυφος Ελλάδα москва Привет мир İstanbul ŞEKER ǅemal µs ﬁnance Ⅻ ½ ① ＡＢＣ"
).split()
_SNIPPETS = (
    "你好，世界", "日本語のテキスト", "한국어 문장", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
    "สวัสดีชาวโลก", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "e\u0301", "a\u0308\u0323", "\u1e9b\u0323",
    "Å", "Ω", "ﬀ", "㎒", "\u00a0", "\u2003", "\u200b", "\u200d", "\ufeff", "\t", "\n", "\r\n",
    "   ", "\x00", "\x07", "\x1b[0m", "\x7f", "\ue000", "\U000f0001", "\ud7ff", "\ufffd",
    "<|endoftext|>", "<|startoftext|>", "[CLS]", "[SEP]", "[MASK]", "<|0.00|>", "<|1.24|>",
    "<|notimestamps|>", "http://example.com/a?b=c&d=e", "user@example.org", "3.14159",
    "1,000,000", "$42.50", "C++", "x_y-z", "#hashtag", "@mention", "...", "!!!", "?!", "--",
    "(parenthesised)", "[bracketed]", "{braced}", "'quoted'", '"double"', "“smart”", "«guillemets»",
    "ﾃｽﾄ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟙𝟚𝟛", "Ǆ", "ß", "ﬆ", "İ", "ı", "Ⓐ", "™", "©",
)
_ALPHABETS = (
    (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
    (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F), (0x2000, 0x206F),
    (0x0, 0x1F), (0x300, 0x36F), (0xE000, 0xE0FF), (0xFF00, 0xFFEF),
)


def _random_chars(rng: random.Random, n: int) -> str:
    lo, hi = rng.choice(_ALPHABETS)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(n))


def _piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.5:
        word = rng.choice(_WORDS)
        if rng.random() < 0.1:
            return word.upper()
        return word.capitalize() if rng.random() < 0.2 else word
    if kind < 0.8:
        return rng.choice(_SNIPPETS)
    if kind < 0.95:
        return _random_chars(rng, rng.randint(1, 8))
    return " " * rng.randint(2, 6)


def make_texts(n: int, seed: int = 0) -> list[str]:
    """`n` strings: words, scripts, emoji, marks, controls, specials, whitespace runs, long text."""
    rng = random.Random(seed)
    texts = ["", " ", "a", "Hello, world!", "  leading and trailing  "]
    while len(texts) < n:
        short = rng.random() < 0.95
        length = rng.choice((1, 2, 3, 5, 8, 13, 21, 40)) if short else rng.randint(150, 400)
        seps = (" ", " ", " ", "", "  ", "\n", "\t")
        texts.append("".join(_piece(rng) + rng.choice(seps) for _ in range(length)))
    return texts[:n]


def make_sentences(n: int, seed: int = 1) -> list[str]:
    """`n` plain English-like sentences (for throughput benchmarks)."""
    rng = random.Random(seed)
    words = [w for w in _WORDS if w.isascii()]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) + "." for _ in range(n)]


def make_ascii_texts(n: int, seed: int = 0) -> list[str]:
    """`n` ASCII strings with the corpus's ASCII hard cases: controls, NUL, DEL, tabs, line
    breaks, whitespace runs, literal special tokens, upper case, punctuation, long text."""
    rng = random.Random(seed)
    words = [w for w in _WORDS if w.isascii()]
    snippets = [s for s in _SNIPPETS if s.isascii()]
    controls = "".join(map(chr, (*range(0x20), 0x7F)))

    def piece() -> str:
        kind = rng.random()
        if kind < 0.5:
            word = rng.choice(words)
            return word.upper() if rng.random() < 0.1 else word
        if kind < 0.75:
            return rng.choice(snippets)
        if kind < 0.9:
            return "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(1, 6)))
        return "".join(rng.choice(controls + " ") for _ in range(rng.randint(1, 4)))

    texts = ["", " ", "\t\n", "a", "Hello, world!", "  leading and trailing  "]
    while len(texts) < n:
        length = rng.choice((1, 2, 3, 5, 8, 13, 21, 40)) if rng.random() < 0.95 else 200
        seps = (" ", " ", " ", "", "  ", "\n", "\t", "\r\n", "\x0b", "\x0c")
        texts.append("".join(piece() + rng.choice(seps) for _ in range(length)))
    return texts[:n]
