"""Attributes read from captions (eval/caption_attributes.py) on hand-written captions, and their join to an index."""
import pandas as pd
import pytest

from contrastive.errors import UserError
from contrastive.eval.arith import join_labels
from contrastive.eval.caption_attributes import ANIMAL, CLOTHING_COLOR, agreed_value, attribute_table, captions_of_index, \
    read_captions, values_named


@pytest.mark.parametrize("caption, expected", [
    ("A man in a red shirt is running .", {"red"}),
    ("a girl wearing a dark green dress", {"green"}),           # one word between colour and garment
    ("A boy in a blue and white jacket", {"blue", "white"}),    # two words between: both colours
    ("A woman in a grey coat", {"gray"}),
    ("A red ball lies near a man in a shirt", set()),            # colour too far from the garment
    ("A man in red pants and a hat", set()),                     # not an upper-body garment
    ("The wall is red , shirts hang on it", set()),              # punctuation ends the phrase
    ("a black dog runs past a man", set()),                      # a colour with no garment
])
def test_clothing_colour_needs_a_garment_close_after_it(caption, expected):
    assert values_named(caption, CLOTHING_COLOR) == expected


@pytest.mark.parametrize("caption, expected", [
    ("Two puppies play in the snow", {"dog"}),
    ("A kitten sleeps", {"cat"}),
    ("A dog chases a cat", {"dog", "cat"}),
    ("A man rides a pony past a bird", {"horse", "bird"}),
    ("A doghouse in a yard", set()),                             # whole words only
])
def test_animal_words(caption, expected):
    assert values_named(caption, ANIMAL) == expected


def test_a_value_needs_two_captions_and_no_rival():
    assert agreed_value(["A dog runs .", "A brown dog in the grass", "A field ."], ANIMAL) == "dog"
    assert agreed_value(["A dog runs .", "An animal in the grass", "A field ."], ANIMAL) is None   # one caption
    assert agreed_value(["A dog runs .", "A dog and a cat", "A puppy ."], ANIMAL) is None       # a rival names cat
    assert agreed_value(["A man in a red shirt", "Man in red jacket", "a man in a blue coat"], CLOTHING_COLOR) is None
    assert agreed_value(["A man in a red shirt", "Man in red jacket", "a man outside"], CLOTHING_COLOR) == "red"
    assert agreed_value(["A man in a red shirt", "Man outside"], CLOTHING_COLOR, min_agree=1) == "red"


def test_table_from_a_captions_file_and_split_list(tmp_path):
    captions = tmp_path / "captions.txt"
    # Kaggle's layout: captions with commas are quoted.
    captions.write_text('image,caption\n'
                        'a.jpg,"A dog, wet, in a red shirt ."\na.jpg,A puppy in a red jacket\na.jpg,A dog\n'
                        'b.jpg,A cat on a mat\nb.jpg,A kitten in a blue sweater\nb.jpg,"A cat, a man in a green shirt"\n'
                        'c.jpg,A dog\nc.jpg,A dog\n')
    split = tmp_path / "dev.txt"
    split.write_text("b.jpg\na.jpg\n")
    table = attribute_table(read_captions(captions, images_list=split))
    assert table.fillna("-").to_dict("records") == [{"image": "b.jpg", "animal": "cat", "clothing_color": "-"},
                                                    {"image": "a.jpg", "animal": "dog", "clothing_color": "red"}]
    split.write_text("a.jpg\nz.jpg\n")
    with pytest.raises(UserError, match="1 images of .* have no captions"):
        read_captions(captions, images_list=split)


def test_labels_join_the_index_by_file_name():
    frame = pd.DataFrame({"image_path": ["000000000", "000000001", "000000002"], "caption": ["x", "y", "z"],
                          "url": ["Images/a.jpg", "Images/b.jpg", "Images/c.jpg"]})
    labels = pd.DataFrame({"image": ["c.jpg", "a.jpg", "q.jpg"], "animal": ["cat", "dog", "bird"]})
    joined = join_labels(frame, labels, source="labels.csv")
    assert joined["animal"].fillna("-").tolist() == ["dog", "-", "cat"]
    # Without a url column the sample keys are the names.
    by_key = join_labels(frame.drop(columns="url"), pd.DataFrame({"image": ["000000001"], "animal": ["dog"]}),
                         source="labels.csv")
    assert by_key["animal"].fillna("-").tolist() == ["-", "dog", "-"]
    with pytest.raises(UserError, match="no image of labels.csv matches"):
        join_labels(frame, pd.DataFrame({"image": ["q.jpg"], "animal": ["dog"]}), source="labels.csv")


def test_captions_of_an_index_prefer_the_json_list():
    frame = pd.DataFrame({"image_path": ["k0", "k1"], "caption": ["first of k0", "one\ntwo"],
                          "captions": ['["first of k0", "second of k0"]', None]})
    assert captions_of_index(frame) == {"k0": ["first of k0", "second of k0"], "k1": ["one", "two"]}
