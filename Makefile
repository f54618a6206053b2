# Mirrors CI locally.
.PHONY: ci test fmt clippy bench
ci:
	bash .ci/run
test:
	cargo test --release --workspace
fmt:
	cargo fmt --all
clippy:
	cargo clippy --all-targets --release -- -D warnings
bench:
	bash bench/run.sh
