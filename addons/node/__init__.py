"""The `+ .runtime` node steps: ACR login, credential files, upstreams, hosts.toml, containerd config, node checks, services."""
