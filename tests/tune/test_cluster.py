"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own JSON schema and its config preparation)."""
import json
from pathlib import Path

import jsonschema
import ray
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_matches_rays_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"]["trial_driver"] >= 1
    assert any("127.0.0.1" in cmd for cmd in config["head_start_ray_commands"] if "mlflow" in cmd)


def _commands(config):
    keys = ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
            "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key, [])]


def test_cluster_contract_shared_root_tracking_pins_and_code_once():
    config = yaml.safe_load(CLUSTER.read_text())
    commands = _commands(config)
    assert not any("|| true" in cmd or "mount-s3" in cmd for cmd in commands)  # a failed mount fails setup
    assert any("mount -t nfs4" in cmd and "/mnt/raylab" in cmd for cmd in config["worker_setup_commands"])
    assert any("nfs-kernel-server" in cmd for cmd in config["head_setup_commands"])
    mlflow = next(cmd for cmd in config["head_start_ray_commands"] if "mlflow server" in cmd)
    store = mlflow.split("--backend-store-uri ")[1].split()[0]
    assert store.startswith("sqlite:////home/") and "/mnt/raylab" not in store  # head-local, one writer
    assert "--workers 1" in mlflow and "--host 127.0.0.1" in mlflow and "/mnt/raylab/mlartifacts" in mlflow
    assert any("torch==2.13.0" in cmd for cmd in config["setup_commands"])
    assert any('"ray[default,tune,train,data]==2.60.0"' in cmd for cmd in config["setup_commands"])
    assert all(target.endswith("auth_token") for target in config.get("file_mounts", {}))  # code: --working-dir
    assert not any("pip install -e" in cmd for cmd in commands)
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in commands if "ray start" in cmd)
    assert config["available_node_types"]["head"]["resources"]["CPU"] == 0  # the head takes no work


def test_schema_rejects_a_misspelled_key():
    config = yaml.safe_load(CLUSTER.read_text())
    config["worker_nodes"] = {}
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as err:
        assert "worker_nodes" in str(err.message)
    else:
        raise AssertionError("the schema accepted an unknown top-level key")
