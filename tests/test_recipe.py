import tomllib

import pytest

from deploykit.errors import RecipeError
from deploykit.recipe import RECIPES_DIR, load_recipe, recipe_from_dict


def small_data():
    return tomllib.loads((RECIPES_DIR / "centerpoint_pillar_small.toml").read_text())


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
def test_bundled_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.arch == name.split("_")[0] if name.startswith("bev") else recipe.arch == "centerpoint_pillar"
    # Every bundled recipe's pass list must apply to its own model.
    from deploykit.passes import PASSES

    assert all(p in PASSES for p in recipe.convert.passes)


def test_bevformer_recipes_match_public_and_article_layouts():
    tiny = load_recipe("bevformer_tiny").model
    assert (tiny.bev_h, tiny.bev_w, tiny.encoder_layers, tiny.decoder_layers, tiny.num_query) == (50, 50, 3, 6, 900)
    assert (tiny.backbone.depth, tiny.image_size, tiny.embed_dims) == (50, (480, 800), 256)
    npu = load_recipe("bevformer_npu").model
    assert (npu.bev_h, npu.bev_w, npu.image_size) == (128, 128, (512, 960))
    vb = npu.virtual_bev
    assert (vb.virtual_bev_h, vb.virtual_bev_w, vb.max_numcam_overlap) == (64, 80, 2)


def test_nus_recipe_matches_mmdet3d_config():
    m = load_recipe("centerpoint_pillar_nus").model
    assert m.voxelization.grid_size == (512, 512, 1)
    assert m.pillar_channels == 11
    assert m.output_stride == 4
    assert [len(t.class_names) for t in m.head.tasks] == [1, 2, 2, 1, 2, 2]
    assert list(m.head.common_heads) == ["reg", "height", "dim", "rot", "vel"]


def test_unknown_field_suggests_the_closest():
    data = small_data()
    data["model"]["pillar_encoder"]["feat_channel"] = [64]
    with pytest.raises(RecipeError, match="unknown field 'feat_channel' \\(did you mean 'feat_channels'\\?\\)"):
        recipe_from_dict(data)
    data = small_data()
    data["convet"] = {}
    with pytest.raises(RecipeError, match="did you mean 'convert'"):
        recipe_from_dict(data)


def test_wrong_types_and_missing_fields():
    data = small_data()
    data["model"]["voxelization"]["max_pillars"] = "many"
    with pytest.raises(RecipeError, match="model.voxelization.max_pillars: expected int"):
        recipe_from_dict(data)
    data = small_data()
    del data["model"]["head"]["tasks"]
    with pytest.raises(RecipeError, match="missing required field 'tasks'"):
        recipe_from_dict(data)
    data = small_data()
    data["model"]["arch"] = "centerpoint_pilar"
    with pytest.raises(RecipeError, match="did you mean 'centerpoint_pillar'"):
        recipe_from_dict(data)


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match="did you mean 'centerpoint_pillar_small'"):
        load_recipe("centerpoint_pillar_smal")


def test_recipe_path_forms(tmp_path):
    assert load_recipe("recipes/centerpoint_pillar_small").name == "centerpoint_pillar_small"
    assert load_recipe(RECIPES_DIR / "centerpoint_pillar_small.toml").name == "centerpoint_pillar_small"
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)
