#!/usr/bin/env bash
# What tests/test_slurm.py needs from Debian: SLURM's daemons and commands (slurm-wlm),
# munge (its authentication) and shellcheck. Installs only what is missing; run as root.
#
#   bash .ci/install-slurm.sh
set -euo pipefail
missing=()
for pkg in slurm-wlm munge shellcheck; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "install-slurm.sh: installing ${missing[*]}"
    apt-get update -qq
    # The daemons are not started here (no systemd): the tests start their own cluster.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
