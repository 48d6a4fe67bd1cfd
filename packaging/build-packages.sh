#!/usr/bin/env bash
# Builds the nbd-rs packages from a checkout:
#   target/debian/nbd-rs_VERSION-1_ARCH.deb          (cargo-deb)
#   target/generate-rpm/nbd-rs-VERSION-1.ARCH.rpm    (cargo-generate-rpm)
#
# What goes into them is in Cargo.toml ([package.metadata.deb], [package.metadata.generate-rpm]);
# the maintainer scripts are in packaging/debian/ and packaging/rpm/. Steps:
#   1. install what is missing: build packages (Debian), cargo-deb and cargo-generate-rpm;
#   2. cargo build --release (the binary, and the man page generator);
#   3. the man pages, into target/packaging/man/ (examples/gen-man.rs: nbd-rs(1) and one page
#      per subcommand from the clap definitions, nbd-rs.toml(5) from packaging/man/);
#   4. the .deb, then the .rpm (from a stripped copy of the binary, target/packaging/nbd-rs).
# Prints the paths of the two packages last.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
step() { echo "== build-packages: $*"; }

export PATH="$HOME/.cargo/bin:$PATH"
# The package metadata names files under ./target (the man pages, the stripped binary).
unset CARGO_TARGET_DIR CARGO_BUILD_TARGET_DIR

# 1. Tools.
missing=()
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)   # the S3 client links OpenSSL
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v dpkg-shlibdeps >/dev/null || missing+=(dpkg-dev)    # cargo-deb: Depends: $auto
command -v strip >/dev/null || missing+=(binutils)
command -v gzip >/dev/null || missing+=(gzip)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! cargo deb --version >/dev/null 2>&1; then
  step "installing cargo-deb"
  cargo install --locked cargo-deb
fi
if ! cargo generate-rpm --version >/dev/null 2>&1; then
  step "installing cargo-generate-rpm"
  cargo install --locked cargo-generate-rpm
fi

# Reproducible dates (man page headers, archive times): the last commit's, when there is one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ] && git rev-parse --git-dir >/dev/null 2>&1; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] && export SOURCE_DATE_EPOCH
fi

# 2. The binary and the man page generator, in one build.
step "cargo build --release"
cargo build --release --bin nbd-rs --example gen-man

# 3. Man pages.
step "man pages"
man_dir=target/packaging/man
rm -rf "$man_dir"
mkdir -p "$man_dir"
target/release/examples/gen-man "$man_dir"
gzip -9 -n "$man_dir"/*.1 "$man_dir"/*.5

# 4. Packages.
step "cargo deb"
cargo deb --no-build --strip   # the release profile keeps line tables; the package does not

step "cargo generate-rpm"
strip -s -o target/packaging/nbd-rs target/release/nbd-rs
cargo generate-rpm

deb=$(ls -t target/debian/nbd-rs_*.deb | head -n 1)
rpm=$(ls -t target/generate-rpm/nbd-rs-*.rpm | head -n 1)
step "done"
echo "$deb"
echo "$rpm"
