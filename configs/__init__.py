"""Model configs (YAML files mapping 1:1 onto mta_serve.config.ModelConfig), installed as mta_serve.configs."""
