"""The test support package (tests/support) as pytest plugins: its fixtures are everyone's."""

pytest_plugins = [
    "support.sim",
    "support.servers",
    "support.s3",
    "support.store",
    "support.fuzz",
    "support.exit",
]
