"""The operator tools: `edgectl`, the demo, the device client and the local daemon that
tests and the demo run. Above `edge/`, `workers/` and `keys/`; none of them imports this."""
