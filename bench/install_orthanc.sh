#!/usr/bin/env bash
# Installs Orthanc and its DICOMweb plugin from Debian packages (idempotent; needs root).
# Daemons are kept from starting during the install (policy-rc.d exit 101): the benchmark starts its own
# Orthanc, with its own configuration, inside a private network namespace. Any Orthanc the package's
# postinst started anyway is stopped by its pid.
set -euo pipefail

PLUGIN_DIR=/usr/share/orthanc/plugins
have() { command -v Orthanc >/dev/null 2>&1 && ls "$PLUGIN_DIR"/libOrthancDicomWeb.so* >/dev/null 2>&1; }

if have; then
  echo "install_orthanc: Orthanc $(Orthanc --version 2>/dev/null | head -n1 | awk '{print $NF}') already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_orthanc: installing Orthanc needs root (apt-get); run 'make bench' as root or install" >&2
  echo "  the Debian packages 'orthanc orthanc-dicomweb' first" >&2
  exit 1
fi

created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

before=$(pgrep -x Orthanc || true)
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y --no-install-recommends orthanc orthanc-dicomweb >/dev/null; then
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends orthanc orthanc-dicomweb >/dev/null
fi
# A daemon the postinst may have started despite policy-rc.d: stop exactly that one.
for pid in $(pgrep -x Orthanc || true); do
  case " $before " in *" $pid "*) ;; *) kill "$pid" 2>/dev/null || true ;; esac
done

if ! have; then
  echo "install_orthanc: the packages installed but Orthanc or $PLUGIN_DIR/libOrthancDicomWeb.so is missing" >&2
  exit 1
fi
echo "install_orthanc: installed Orthanc $(Orthanc --version 2>/dev/null | head -n1 | awk '{print $NF}')"
