#!/usr/bin/env bash
# Prints the Debian mirror this host's apt sources use for the main archive (not security), so
# that packages of another release come from the same place.
set -euo pipefail
uri=$(awk '/^URIs:/ { u = $2 } /^Suites:/ && u !~ /security/ { print u; exit }' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$uri" ] || uri=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' \
    /etc/apt/sources.list 2>/dev/null || true)
[ -n "$uri" ] || { echo "error: no Debian mirror found in the apt sources" >&2; exit 1; }
echo "$uri"
