"""Word material of the RULER tasks: key words, numbers, uuids, pseudo-words and the
noise sentences, all drawn from a seeded ``random.Random`` (nothing downloaded; RULER
drew its words from the ``wonderwords`` lists)."""

from __future__ import annotations

import random
import uuid
from typing import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES = [s.strip() + "." for s in NOISE.split(".") if s.strip()]

ADJECTIVES = (
    "abundant agreeable ancient aquatic bashful bewildered bitter brave breezy calm careful cheerful clever "
    "cloudy colossal cool crooked curious dazzling delightful eager elegant enchanted fancy fearless fierce "
    "fluffy fragile gentle gifted gleaming glorious graceful grumpy handsome helpful hilarious humble icy "
    "jolly jubilant kind lively lonely lucky magnificent mellow melodic mighty misty modern mysterious "
    "nervous nimble noisy obedient odd old orange perfect plain polite powerful precious proud quaint quick "
    "quiet rapid rare rich rough royal rustic scary shiny shy silent silly sleepy slimy smooth sparkling "
    "spicy splendid steady stormy strange sturdy sunny superb swift tall tame tender thankful thirsty tidy "
    "tiny tranquil ugly upbeat vast victorious vivid wandering warm wealthy whimsical wicked wide wild "
    "windy wise witty wooden worried young zany zealous"
).split()
NOUNS = (
    "airport alligator anchor apple apron arch armchair arrow avocado badge bakery balloon banjo barn "
    "basket beach beaver bench bicycle biscuit blanket blender bottle boulder bracelet bridge broom "
    "bucket butterfly cabin cactus camel candle cannon canoe carpet castle cathedral cello chimney "
    "citadel clock closet cobra compass cookie cottage crayon crocodile crown cupboard curtain dagger "
    "desert diamond dolphin donkey dragon drum eagle easel elephant emerald engine falcon feather fiddle "
    "flamingo flute fountain fox galaxy garden gazelle giraffe glacier goblet gondola guitar hammock "
    "harbor harp hedgehog helmet hippo hurricane igloo island jacket jaguar jellyfish kangaroo kettle "
    "kite koala ladder lagoon lantern lemon leopard library lighthouse lizard lobster locket magnet "
    "mango meadow meteor microscope mirror monastery moose mountain mushroom necklace nest oasis octopus "
    "orchard ostrich otter owl paddle pagoda palace panda parrot peacock pelican pencil penguin piano "
    "pyramid quilt rabbit raccoon radio rainbow raven reindeer rocket saddle salmon sandal satellite "
    "scarf scooter seahorse shovel skyscraper sled snail spaceship squirrel stadium starfish statue "
    "submarine sunflower swan sword telescope temple tiger tornado tortoise tractor trumpet tulip turtle "
    "umbrella unicorn vase violin volcano walrus waterfall whale whistle windmill wizard zebra"
).split()
CONSONANTS = "bcdfghjklmnprstvz"
VOWELS = "aeiou"
PROFESSIONS = (
    "architect baker carpenter chemist dentist designer editor electrician engineer farmer firefighter "
    "florist gardener geologist historian jeweler journalist lawyer librarian linguist mechanic musician "
    "nurse painter pharmacist photographer pilot plumber potter sailor sculptor surgeon tailor teacher "
    "translator veterinarian weaver writer"
).split()


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_key_word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(kind: str, rng: random.Random) -> str:
    return {"numbers": random_number, "words": random_key_word, "uuids": random_uuid}[kind](rng)


def pseudo_word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))


def unique_words(rng: random.Random, n: int, make: Callable[[random.Random], str]) -> list[str]:
    out, seen = [], set()
    while len(out) < n:
        w = make(rng)
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
