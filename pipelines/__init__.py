"""Pipeline definitions (installed as `kftune.pipelines`)."""
