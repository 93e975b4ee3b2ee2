#!/usr/bin/env bash
# Installs the system programs the integration tests run for real: Debian's `prometheus`.
# Where it cannot be installed (no root, no apt) the tests that need it skip loudly -
# except under CI=true, where a missing Prometheus is an error.
set -u
if command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then
  exit 0
fi
echo "installing Debian's prometheus for the integration tests..."
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # The package's postinst would start a system service; policy-rc.d 101 keeps it from doing so.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
if ! [ -x /usr/bin/prometheus ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "error: could not install prometheus (apt-get install prometheus); CI needs it" >&2
    exit 1
  fi
  echo "WARNING: prometheus is not installed; tests that scrape a real Prometheus will be SKIPPED" >&2
fi
exit 0
