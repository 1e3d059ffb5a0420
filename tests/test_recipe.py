"""The Recipe holds what the run id is cut from (every plug-in spec with its defaults filled in) and the run
directory named by it: the plan and the run read these from the Recipe, and they agree with the functions that
name a config's run elsewhere (sweeps, status)."""

from pathlib import Path

from compress.recipe import Recipe, load_config, run_dir_for, run_id_of

TINY = Path(__file__).parent.parent / "experiments" / "configs" / "tiny-test.yaml"


def test_the_recipe_holds_the_resolved_specs_its_run_id_and_run_directory(tmp_path):
    cfg = load_config(TINY, [f"output.dir={tmp_path}", "losses=[{name: affinity}]", "inheritance={name: manual}"])
    recipe = Recipe.of(cfg)
    assert recipe.run_id == run_id_of(cfg)
    assert recipe.run_dir == run_dir_for(cfg) == tmp_path / f"{cfg.name}-{recipe.run_id}"
    assert recipe.layout.result == recipe.run_dir / "result.json"
    # the affinity loss's defaults (its scale, the two directions' weights) are written out in the identity
    (loss,) = recipe.identity["losses"]
    assert loss["name"] == "affinity" and {"scale", "weight_i2t", "weight_t2i", "weight"} <= set(loss)
    assert recipe.identity["inheritance"]["name"] == "manual" and len(recipe.identity["inheritance"]) > 1
    # writing a default out gives the same Recipe identity
    explicit = load_config(TINY, [f"output.dir={tmp_path}", f"losses=[{{name: affinity, scale: {loss['scale']}}}]",
                                  "inheritance={name: manual}"])
    assert Recipe.of(explicit).identity == recipe.identity and Recipe.of(explicit).run_id == recipe.run_id


def test_a_run_name_names_the_recipe_s_directory(tmp_path):
    cfg = load_config(TINY, [f"output.dir={tmp_path}", "output.run_name=mine"])
    assert Recipe.of(cfg).run_dir == tmp_path / "mine" == run_dir_for(cfg)
