# shellcheck shell=bash
# Debian's Chromium for the web page test (tests/test_web.py); Playwright's own browser
# downloads are not used. Idempotent: installs only when /usr/bin/chromium is missing.
#
#   source .ci/chromium.sh && python -m pytest tests/test_web.py -q

_rs_chromium_main() {
    if [ -x /usr/bin/chromium ]; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != "0" ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
    [ -x /usr/bin/chromium ]
}

_rs_chromium_main
