"""Device profiles: declarative YAML files that pick execution providers and the export recipe."""
