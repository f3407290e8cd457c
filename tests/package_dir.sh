# Sourced by tests/sanitize/run.sh and tests/portable/run.sh: package_dir BUILD makes
# BUILD/pkg, a tensorslim package whose _C is BUILD's (its Python files linked to
# python/tensorslim), sets PKG to it and makes the editable install step aside.
package_dir() {
  PKG="$1/pkg"
  rm -rf "$PKG" && mkdir -p "$PKG/tensorslim"
  for f in python/tensorslim/*; do ln -s "$PWD/$f" "$PKG/tensorslim/"; done
  ln -sf "$PWD/$1/"_C.*.so "$PKG/tensorslim/"
  export SKBUILD_EDITABLE_SKIP="$PWD/build/$(ls build | head -n 1)"
}
