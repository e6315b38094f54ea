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
