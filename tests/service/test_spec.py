import pytest

import workers.data
from service.spec import JobSpec, SpecError, load_spec, parse_spec


def fields(excinfo) -> list[str]:
    return [loc for loc, _ in excinfo.value.errors]


def test_defaults_are_the_design_defaults():
    spec = parse_spec({})
    assert spec.model.arch == "mlp" and spec.data.name == "digits"
    assert spec.data.augment is None and spec.data.config().augment is False
    assert spec.prune.target_sparsity == 0.9 and spec.prune.phases == 3 and spec.prune.scope == "global"
    assert spec.retrain.schedule == "llr" and spec.retrain.epochs == 5 and spec.retrain.lr is None
    assert spec.soup.ingredients == 4 and spec.soup.vary == "seed" and spec.soup.method == "uniform"
    assert spec.resources.cpus_per_ingredient == 1 and spec.resources.gpus_per_ingredient == 0


@pytest.mark.parametrize("data,field,words", [
    ({"prune": {"target_sparsity": 1.0}}, "prune.target_sparsity", "less than 1"),
    ({"prune": {"target_sparsity": -0.1}}, "prune.target_sparsity", "greater than or equal to 0"),
    ({"prune": {"phases": 0}}, "prune.phases", "greater than or equal to 1"),
    ({"model": {"arch": "resnet9000"}}, "model.arch", "unknown arch"),
    ({"data": {"name": "imagenet-from-the-web"}}, "data.name", "unknown dataset"),
    ({"data": {"name": "npz", "path": "/no/such/file.npz"}}, "data.path", "not readable"),     # outside the roots
    ({"data": {"name": "npz"}}, "data", "needs data.path"),
    ({"model": {"checkpoint": "/no/such/model.safetensors"}}, "model.checkpoint", "not readable"),
    ({"soup": {"ingredients": 0}}, "soup.ingredients", "greater than or equal to 1"),
    ({"soup": {"ingredients": 1000}}, "soup.ingredients", "less than or equal to 64"),
    ({"retrain": {"epochs": 100000}}, "retrain.epochs", "less than or equal to 1000"),
    ({"retrain": {"schedule": "warp"}}, "retrain.schedule", "llr"),
    ({"soup": {"ingredients": 2, "min_ingredients": 3}}, "soup", "exceeds"),
    ({"soup": {"ingredients": 2, "values": [1, 2, 3]}}, "soup", "one per ingredient"),
    ({"soup": {"method": "greedy"}, "data": {"val_fraction": 0}}, "spec", "data.val_fraction must be > 0"),
    ({"prune": {"target_sparsity": 0.9, "bogus": 1}}, "prune.bogus", "Extra inputs"),
    ({"search": {"trials": 3}}, "search.space", "Field required"),
    ({"search": {"space": {"momentum": {"choice": [0.9]}}}}, "search.space.momentum", "Extra inputs"),
    ({"search": {"space": {"lr": {"loguniform": [-0.1, 0.5]}}}}, "search.space.lr", "must be positive"),
    ({"search": {"space": {"lr": {"uniform": [-0.1, 0.5]}}}}, "search.space.lr", "(0, 10]"),
    ({"search": {"space": {"schedule": {"choice": []}}}}, "search.space.schedule", "must not be empty"),
    ({"search": {"space": {"schedule": {"choice": ["warp"]}}}}, "search.space.schedule", "llr"),
    ({"search": {"space": {"epochs": {"uniform": [1, 3]}}}}, "search.space.epochs", "whole numbers"),
    ({"search": {"space": {"lr": {"uniform": [0.5, 0.1]}}}}, "search.space.lr", "low <= high"),
    ({"search": {"space": {}}}, "search.space", "empty"),
    ({"search": {"space": {"lr": {"choice": [0.1]}}, "trials": 0}}, "search.trials", "greater than or equal to 1"),
    ({"search": {"space": {"lr": {"choice": [0.1]}}, "metric": "test_accuracy"}}, "search.metric", "val_accuracy"),
    ({"search": {"space": {"lr": {"choice": [0.1]}}, "phases": [5]}}, "spec", "search.phases"),
])
def test_invalid_specs_name_the_field(data, field, words):
    with pytest.raises(SpecError) as excinfo:
        parse_spec(data)
    assert field in fields(excinfo), excinfo.value.errors
    assert words in str(excinfo.value)


def test_load_spec_from_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nprune: {target_sparsity: 0.5, phases: 2}\nsoup: {ingredients: 2}\n")
    spec = load_spec(path)
    assert isinstance(spec, JobSpec) and spec.prune.phases == 2 and spec.soup.ingredients == 2
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_search_space_samples_within_its_bounds_and_trial_phases():
    import random
    spec = parse_spec({"prune": {"phases": 3}, "search": {"space": {
        "schedule": {"choice": ["llr", "allr"]}, "lr": {"loguniform": [0.01, 0.5]}, "epochs": {"randint": [2, 4]},
        "weight_decay": {"uniform": [0.0, 0.001]}}, "phases": [2, 3]}})
    rng = random.Random(0)
    draws = [spec.search.space.sample(rng) for _ in range(300)]
    assert {d["schedule"] for d in draws} == {"llr", "allr"}
    assert {d["epochs"] for d in draws} == {2, 3, 4} and all(isinstance(d["epochs"], int) for d in draws)
    assert all(0.01 <= d["lr"] <= 0.5 and 0 <= d["weight_decay"] <= 0.001 for d in draws)
    assert 0.15 < sum(d["lr"] < 0.0707 for d in draws) / 300 < 0.85      # log-uniform: about half below the geometric mean
    assert [spec.search.applies(t) for t in (1, 2, 3)] == [False, True, True]
    assert spec.search.mode == "max" and parse_spec({"search": {"space": {"lr": {"choice": [0.1]}},
                                                                "metric": "val_loss"}}).search.mode == "min"


@pytest.mark.parametrize("data,augment", [
    ({"name": "digits"}, False),
    ({"name": "synthetic"}, False),
    ({"name": "fashion_mnist"}, False),                       # Debian's package (installed by make test)
    ({"name": "fashion_mnist", "augment": True}, True),
    ({"name": "cifar10"}, True),
    ({"name": "cifar100"}, True),
    ({"name": "cifar10", "augment": False}, False),
    ({"name": "npz", "augment": None}, False),
])
def test_augment_null_is_the_datasets_default_and_a_value_overrides_it(tmp_path, data, augment):
    for folder in ("cifar-10-batches-py", "cifar-100-python"):           # check_data only looks for the folder
        (tmp_path / folder).mkdir()
    (tmp_path / "d.npz").write_bytes(b"")
    path = {"cifar10": str(tmp_path), "cifar100": str(tmp_path), "npz": str(tmp_path / "d.npz")}.get(data["name"])
    spec = parse_spec({"data": {**data, "path": path}})
    assert spec.data.augment == data.get("augment")                       # the spec keeps what was asked
    assert spec.data.config().augment is augment                          # the pipeline reads the resolved bool
    assert parse_spec(spec.model_dump(mode="json")) == spec               # and it round-trips as stored


@pytest.fixture
def no_datasets(tmp_path, monkeypatch):
    """No Debian package, no $LADLE_DATA and an empty home: every IDX dataset is missing."""
    monkeypatch.setattr(workers.data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    monkeypatch.delenv("LADLE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.mark.parametrize("data,words", [
    ({"name": "fashion_mnist"}, ["data.name: dataset 'fashion_mnist' not found", "debian",
                                 "apt-get install dataset-fashion-mnist", "data.path"]),
    ({"name": "fashion_mnist", "path": "{tmp}"}, ["data.path: dataset 'fashion_mnist' not found in {tmp}",
                                                  "train-images-idx3-ubyte", "dataset-fashion-mnist"]),
    ({"name": "mnist"}, ["data.name: dataset 'mnist' not found", "~/.ladle/data", "t10k-labels-idx1-ubyte",
                         "Debian has no MNIST package"]),
    ({"name": "cifar10"}, ["data.name: dataset cifar10 not found under", "cifar-10-batches-py"]),
])
def test_a_missing_dataset_is_a_spec_error_saying_how_to_get_it(no_datasets, data, words):
    data = {k: v.format(tmp=no_datasets) for k, v in data.items()}
    with pytest.raises(SpecError) as excinfo:
        parse_spec({"data": data})
    assert fields(excinfo) == ["data"]
    for w in words:
        assert w.format(tmp=no_datasets) in str(excinfo.value)


def test_dense_optimizer_defaults_to_sgd_and_sfw_has_typed_settings():
    spec = parse_spec({})
    assert spec.dense.optimizer == "sgd"
    assert spec.dense.optimizer_config(spec.retrain.optimizer.config()) == spec.retrain.optimizer.config()
    sfw = parse_spec({"dense": {"optimizer": "sfw", "lr": 0.3,
                                "sfw": {"constraint": "k_sparse", "k": 0.1, "radius_factor": 5,
                                        "rescale": "diameter"}}})
    cfg = sfw.dense.optimizer_config(sfw.retrain.optimizer.config())
    assert cfg.name == "sfw" and cfg.sfw.constraint == "k_sparse" and cfg.sfw.k == 0.1
    assert cfg.sfw.radius_factor == 5.0 and cfg.sfw.rescale == "diameter" and cfg.sfw.momentum == 0.9
    default = parse_spec({"dense": {"optimizer": "sfw"}}).dense.sfw
    assert (default.constraint, default.k, default.rescale) == ("k_support", 0.05, "gradient")


def test_an_sfw_spec_survives_being_stored_and_read_back():
    spec = parse_spec({"dense": {"optimizer": "sfw", "sfw": {"constraint": "linf", "k": 0.2, "momentum": 0.5}}})
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec
    assert parse_spec(spec.model_dump(mode="json")) == spec
    assert parse_spec(spec.model_dump(mode="json")).dense.sfw.constraint == "linf"


@pytest.mark.parametrize("data,field,words", [
    ({"dense": {"optimizer": "adam"}}, "dense.optimizer", "'sgd' or 'sfw'"),
    ({"dense": {"optimizer": "sfw", "sfw": {"constraint": "l3"}}}, "dense.sfw.constraint", "k_support"),
    ({"dense": {"optimizer": "sfw", "sfw": {"k": 0}}}, "dense.sfw.k", "greater than 0"),
    ({"dense": {"optimizer": "sfw", "sfw": {"k": 1.5}}}, "dense.sfw.k", "less than or equal to 1"),
    ({"dense": {"optimizer": "sfw", "sfw": {"radius_factor": 0}}}, "dense.sfw.radius_factor", "greater than 0"),
    ({"dense": {"optimizer": "sfw", "sfw": {"momentum": 1.0}}}, "dense.sfw.momentum", "less than 1"),
    ({"dense": {"optimizer": "sfw", "sfw": {"rescale": "adam"}}}, "dense.sfw.rescale", "gradient"),
    ({"dense": {"optimizer": "sfw", "sfw": {"kk": 1}}}, "dense.sfw.kk", "Extra inputs"),
    ({"dense": {"sfw": {"k": 0.1}}}, "dense", "only used with dense.optimizer sfw"),
    ({"dense": {"optimizer": "sfw", "lr": 2.0, "sfw": {"rescale": "none"}}}, "dense", "at most 1"),
])
def test_invalid_sfw_settings_name_the_field(data, field, words):
    with pytest.raises(SpecError) as excinfo:
        parse_spec(data)
    assert field in fields(excinfo), excinfo.value.errors
    assert words in str(excinfo.value)


# ---------------------------------------------------------------- N:M patterns for image models

@pytest.mark.parametrize("arch", ["mlp", "lenet5", "resnet20"])
@pytest.mark.parametrize("pattern,sparsity", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), (" 2:4 ", 0.5)])
def test_image_models_take_nm_patterns_with_one_phase(arch, pattern, sparsity):
    spec = parse_spec({"model": {"arch": arch}, "prune": {"pattern": pattern, "target_sparsity": sparsity, "phases": 1}})
    assert spec.prune.pattern == pattern.strip() and spec.prune.target_sparsity == sparsity


def test_nm_pattern_derives_the_target_and_the_phase_when_left_out():
    spec = parse_spec({"prune": {"pattern": "1:4"}})
    assert spec.prune.target_sparsity == 0.75 and spec.prune.phases == 1
    # a dumped spec (as stored with the job) parses back to itself
    assert parse_spec(spec.model_dump()) == spec


@pytest.mark.parametrize("prune,field,words", [
    ({"pattern": "2:4", "target_sparsity": 0.9, "phases": 1}, "prune", "target_sparsity must be that"),
    ({"pattern": "2:4", "phases": 3}, "prune", "phases must be 1, not 3"),
    ({"pattern": "4:2"}, "prune.pattern", "unknown sparsity pattern '4:2'"),
    ({"pattern": "0:4"}, "prune.pattern", "0 < N < M"),
    ({"pattern": "dense"}, "prune.pattern", "unknown sparsity pattern"),
    ({"pattern": "2:4", "criterion": "wanda"}, "spec", "prune.criterion wanda is for language models"),
    # prune.structure channels removes whole channels: no N:M pattern beside it, a criterion that ranks channels
    ({"pattern": "2:4", "structure": "channels"}, "prune", "prune.structure channels removes whole groups; "
                                                           "prune.pattern 2:4"),
    ({"structure": "channels", "criterion": "lamp"}, "spec", "with prune.structure channels image models take "
                                                            "magnitude, random"),
    ({"structure": "filters"}, "prune.structure", "'unstructured', 'channels' or 'neurons'"),
    ({"structure": "neurons"}, "spec", "prune.structure neurons is for language models; image models take "
                                       "unstructured, channels"),
])
def test_bad_nm_specs_name_the_field(prune, field, words):
    with pytest.raises(SpecError) as excinfo:
        parse_spec({"prune": prune})
    assert field in fields(excinfo), excinfo.value.errors
    assert words in str(excinfo.value)


def test_channel_structure_is_a_prune_option_that_survives_storage():
    spec = parse_spec({"prune": {"structure": "channels", "target_sparsity": 0.5}})
    assert spec.prune.structure == "channels" and parse_spec(spec.model_dump(mode="json")) == spec
    assert parse_spec({}).prune.structure == "unstructured"
