"""Per-image attributes read from human captions by keyword rules, for embedding arithmetic on real photos.

Rules (lower-cased words; punctuation ends a phrase):
- `animal`: a caption names a value when it contains one of the value's words (dog: dog, dogs, puppy, puppies;
  cat: cat, cats, kitten, kittens; horse: horse, horses, pony, ponies; bird: bird, birds).
- `clothing_color`: a caption names colour C when C's word is followed, with at most `MAX_GAP` words between
  them in the same phrase, by a word for a garment worn on the upper body or the whole body ("a red shirt",
  "in a blue and white jacket", "a dark green dress"). Trousers, shoes and hats are left out, so that "a red
  shirt and blue jeans" is one person in red, not a clash. "grey" is read as "gray".
An image takes value V for an attribute when at least `MIN_AGREE` of its captions name V and none names another
value of that attribute; otherwise it has no value (it stays in the gallery but is never a query or a hit).

    python -m contrastive.eval.caption_attributes captions.txt --images-list Flickr_8k.devImages.txt --output labels.csv
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from contrastive.errors import UserError

MIN_AGREE = 2
MAX_GAP = 2
# The column a labels table joins on: an image's file name (its stem is compared, so .jpg or not both match).
IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class Rule:
    """An attribute read from captions: its values with their words, and the templates of its value texts."""

    name: str
    words_by_value: dict
    templates: tuple[str, ...]
    # Garment words the value word must precede (within MAX_GAP words); empty: the value word alone names it.
    followed_by: frozenset = frozenset()


ANIMAL = Rule("animal", {"dog": ("dog", "dogs", "puppy", "puppies"), "cat": ("cat", "cats", "kitten", "kittens"),
                         "horse": ("horse", "horses", "pony", "ponies"), "bird": ("bird", "birds")},
              templates=("{c}", "a {c}", "a photo of a {c}"))
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black", "white", "brown", "gray")
GARMENTS = frozenset({"shirt", "shirts", "tshirt", "jacket", "jackets", "coat", "coats", "dress", "dresses", "top",
                      "sweater", "sweatshirt", "hoodie", "jersey", "jerseys", "uniform", "uniforms", "vest", "suit",
                      "outfit", "outfits", "clothes", "clothing", "swimsuit", "robe", "blouse", "tank"})
CLOTHING_COLOR = Rule("clothing_color", {c: (c,) for c in COLORS},
                      templates=("{c}", "a person in {c}", "a person wearing a {c} shirt"), followed_by=GARMENTS)
RULES = {rule.name: rule for rule in (ANIMAL, CLOTHING_COLOR)}
_SPELLINGS = {"grey": "gray"}


def phrases(caption: str) -> list[list[str]]:
    """Lower-cased words of each phrase (text between punctuation marks)."""
    return [[_SPELLINGS.get(w, w) for w in re.findall(r"[a-z]+", part)]
            for part in re.split(r"[.,;:!?()]", caption.lower())]


def values_named(caption: str, rule: Rule) -> set[str]:
    """The values of `rule` that one caption names."""
    named = set()
    value_of = {w: v for v, words in rule.words_by_value.items() for w in words}
    for words in phrases(caption):
        for i, word in enumerate(words):
            if word not in value_of:
                continue
            if not rule.followed_by or any(w in rule.followed_by for w in words[i + 1:i + 2 + MAX_GAP]):
                named.add(value_of[word])
    return named


def agreed_value(captions: list[str], rule: Rule, *, min_agree: int = MIN_AGREE) -> str | None:
    """The value at least `min_agree` captions name when no caption names another; else None."""
    counts = Counter(v for c in captions for v in values_named(c, rule))
    if len(counts) != 1:
        return None
    (value, count), = counts.items()
    return value if count >= min_agree else None


def attribute_table(captions_by_image: dict[str, list[str]], *, attributes: tuple[str, ...] = tuple(RULES),
                    min_agree: int = MIN_AGREE):
    """DataFrame: `image` (as given) and one column per attribute (None where the captions do not agree)."""
    import pandas as pd

    unknown = [a for a in attributes if a not in RULES]
    if unknown:
        raise UserError(f"no caption rule for {unknown}; the rules are {list(RULES)}")
    rows = [{IMAGE_COLUMN: image, **{a: agreed_value(caps, RULES[a], min_agree=min_agree) for a in attributes}}
            for image, caps in captions_by_image.items()]
    return pd.DataFrame(rows, columns=[IMAGE_COLUMN, *attributes])


def read_captions(path: str | Path, *, images_list: str | Path | None = None) -> dict[str, list[str]]:
    """{image file name: its captions in file order} from a Kaggle-style CSV (`image,caption`, a row per caption),
    restricted to the names in `images_list` (one per line) when given."""
    from contrastive.data_prep.pairs import read_images_list
    from contrastive.eval.captioned import read_kaggle_captions

    path = Path(path)
    if not path.is_file():
        raise UserError(f"captions file {path} does not exist")
    captions = read_kaggle_captions(path)
    if images_list is not None:
        wanted = read_images_list(Path(images_list))
        missing = [n for n in wanted if n not in captions]
        if missing:
            raise UserError(f"{len(missing)} images of {images_list} have no captions in {path}, e.g. {missing[0]}")
        captions = {n: captions[n] for n in wanted}
    return captions


def captions_of_index(frame) -> dict[str, list[str]]:
    """{sample key: captions} from an index's metadata: the sample JSON's `captions` list (stored as JSON text)
    where there is one, else the caption split into lines (CLIP_benchmark's multi-line .txt)."""
    import json

    from contrastive.eval.captioned import caption_list

    keys = frame["image_path"].astype(str).tolist()
    if "captions" in frame.columns:
        lists = [json.loads(c) if isinstance(c, str) and c.startswith("[") else None for c in frame["captions"]]
    else:
        lists = [None] * len(frame)
    return {key: caption_list(str(caption), listed) for key, listed, caption in zip(keys, lists, frame["caption"])}


def value_counts(table) -> dict:
    """{attribute: {value: images}} (images without a value left out)."""
    return {a: {str(v): int(n) for v, n in table[a].dropna().value_counts().sort_index().items()}
            for a in table.columns if a != IMAGE_COLUMN}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.eval.caption_attributes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", type=Path, help="Kaggle-style captions CSV: image,caption (a row per caption)")
    parser.add_argument("--images-list", type=Path, default=None, help="keep only these images (one name a line)")
    parser.add_argument("--min-agree", type=int, default=MIN_AGREE, help="captions that must name the value")
    parser.add_argument("--output", type=Path, required=True, help="CSV: image and one column per attribute")
    args = parser.parse_args(argv)
    try:
        table = attribute_table(read_captions(args.captions, images_list=args.images_list),
                                min_agree=args.min_agree)
    except UserError as e:
        print(f"contrastive.eval.caption_attributes: error: {e}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.output, index=False)
    for attribute, counts in value_counts(table).items():
        print(f"{attribute}: {sum(counts.values())} of {len(table)} images: "
              + ", ".join(f"{v} {n}" for v, n in counts.items()))
    print(f"labels: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
