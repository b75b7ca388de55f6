"""The embedded verifiable task: integer arithmetic with exact-match answers.

Every question is ``"a<op>b="`` with operands of up to ``digits`` digits and the
answer is the integer result in decimal (``"17+25="`` -> ``"42"``). The split
into train and test questions is a deterministic function of the seed, so a
held-out test question is never trained on, in warm-up or in RL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Example

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# The characters the embedded tokenizer must spell every prompt and answer with.
ALPHABET = "0123456789+-*="


@dataclass(frozen=True)
class ArithmeticTask:
    """All questions ``a op b`` with ``0 <= a, b < 10**digits`` and op in ``operators``.

    train, test: disjoint lists of :class:`Example`; ``test_size`` questions are
    held out (at most half of all questions).
    """

    digits: int = 2
    operators: str = "+"
    test_size: int = 200
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 4:
            raise ValueError(f"task digits must be an integer in [1, 4], got {self.digits!r}")
        unknown = sorted(set(self.operators) - set(OPERATORS))
        if not self.operators or unknown:
            raise ValueError(f"task operators must be a non-empty string of {''.join(OPERATORS)}, "
                             f"got {self.operators!r}")
        if self.test_size < 1:
            raise ValueError(f"task test_size must be >= 1, got {self.test_size}")

    def _questions(self) -> list[Example]:
        limit = 10 ** self.digits
        ops = sorted(set(self.operators), key=self.operators.index)
        return [Example(f"{a}{op}{b}=", str(OPERATORS[op](a, b)))
                for op in ops for a in range(limit) for b in range(limit)]

    def split(self) -> tuple[list[Example], list[Example]]:
        """(train, test), shuffled by the seed."""
        questions = self._questions()
        random.Random(f"arithmetic-split-{self.seed}").shuffle(questions)
        test_size = min(self.test_size, len(questions) // 2)
        return questions[test_size:], questions[:test_size]
