import pytest

from sparsecraft import TargetError, select_targets
from sparsecraft.targets import TargetSpec


def test_default_targets_exclude_embeddings_norms_biases_and_head(tiny_lm):
    names = [t.name for t in select_targets(tiny_lm)]
    assert names == ["blocks.0.up.weight", "blocks.0.down.weight", "blocks.1.up.weight", "blocks.1.down.weight"]


def test_default_targets_cnn_include_convs_exclude_classifier(cnn):
    names = [t.name for t in select_targets(cnn)]
    assert names == ["conv1.weight", "conv2.weight", "conv1d.weight", "fc.weight"]


def test_glob_regex_and_type_rules(tiny_lm, cnn):
    assert [t.name for t in select_targets(tiny_lm, {"include": ["*.up.*"]})] == [
        "blocks.0.up.weight", "blocks.1.up.weight"]
    assert [t.name for t in select_targets(tiny_lm, {"include": ["re:blocks\\.1\\..*"]})] == [
        "blocks.1.up.weight", "blocks.1.down.weight"]
    # a module-name rule matches too, and exclusion wins
    assert [t.name for t in select_targets(tiny_lm, {"exclude": ["blocks.0.down"]})] == [
        "blocks.0.up.weight", "blocks.1.up.weight", "blocks.1.down.weight"]
    assert [t.name for t in select_targets(cnn, {"types": ["Conv2d"]})] == ["conv1.weight", "conv2.weight"]
    # the head is selectable when named explicitly
    assert [t.name for t in select_targets(tiny_lm, {"include": ["lm_head"]})] == ["lm_head.weight"]


def test_rule_matching_nothing_lists_existing_names(tiny_lm):
    with pytest.raises(TargetError, match=r"rule '\*attention\*' matches no parameter.*blocks.0.up.weight"):
        select_targets(tiny_lm, TargetSpec(include=["*attention*"]))
    with pytest.raises(TargetError, match="exclude rule 're:nothing' matches no parameter"):
        select_targets(tiny_lm, {"exclude": ["re:nothing"]})
