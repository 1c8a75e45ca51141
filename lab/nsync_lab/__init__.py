"""NSync's test lab: the tools the tests and benchmarks use to run real clusters on one machine
and hurt them (cluster harness, fault proxy, chaos runner). Not part of the shipped package."""
