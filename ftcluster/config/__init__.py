"""The typed config: the schema (schema.py), its composition from conf/ and the command line (compose.py), and
validate() (validate.py), which refuses a bad config by the key's name before any process or cluster starts.
"""

# The functions compose and validate take their modules' names on this package, so `import ftcluster.config.validate
# as m` gives the function; reach a module's own names with `from ftcluster.config.validate import ...`.
from ftcluster.config.compose import ASSETS, apply_schema, compose, conf_dir, load_run_config, schema_has, to_yaml
from ftcluster.config.schema import CHOICES, SweepConfig, TrainConfig
from ftcluster.config.validate import Derived, derive, validate

__all__ = ["ASSETS", "CHOICES", "Derived", "SweepConfig", "TrainConfig", "apply_schema", "compose", "conf_dir",
           "derive", "load_run_config", "schema_has", "to_yaml", "validate"]
