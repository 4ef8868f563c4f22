"""Variable tracking (RULER ``vt``): a chain of assignments ``VAR X = 12345``,
``VAR Y = VAR X``, ... hidden in noise; the answer is every variable that holds the
value (scoring ``all``). No in-context example (RULER has one)."""

from __future__ import annotations

import random
import string

from mixtrain.eval.tasks.base import Sample, register_task
from mixtrain.eval.tasks.fit import LengthFitter
from mixtrain.eval.tasks.haystack import depths_for, insert_in_units
from mixtrain.eval.tasks.words import NOISE_SENTENCES, unique_words


def variable_tracking(task="vt", num_hops: int = 4):
    def generate(tokenizer, length, n_samples, seed, haystack_docs=None, max_new_tokens=None, probe=False):
        max_new = max_new_tokens or 30
        fitter = LengthFitter(tokenizer, length, max_new, probe, task)
        out = []
        for i in range(n_samples):
            rng = random.Random(f"{task}-{seed}-{length}-{i}")
            names = unique_words(rng, num_hops + 1, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)))
            value = str(rng.randint(10000, 99999))
            chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(num_hops)]
            depths = depths_for(i, n_samples, len(chain))
            head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            tail = (
                f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
                f" Answer: According to the chain(s) of variable assignment in the text above, {num_hops + 1} "
                f"variables are assigned the value {value}, they are:"
            )

            def build(h: int) -> str:
                units = [NOISE_SENTENCES[j % len(NOISE_SENTENCES)] for j in range(h)]
                return head + insert_in_units(units, chain, depths, " ") + tail

            _, prompt, ids = fitter.fit(task, build)
            out.append(Sample(task, length, i, prompt, ids, names, max_new, depths))
        return out

    return generate


register_task("vt", variable_tracking(), metric="all", max_new_tokens=30)
