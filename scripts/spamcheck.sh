#!/usr/bin/env bash
# SpamAssassin check of the shipped templates:
#
#   scripts/spamcheck.sh
#
# Renders every template in templates/ as nudge's sender does (subject, lang,
# a signed unsubscribe link, List-Unsubscribe for marketing mail,
# Auto-Submitted for staff mail), writes each as an .eml with nudge's own
# mailer (mail.transport: file), and scores it with SpamAssassin's local tests
# (`spamassassin -L -t`: no network, no DNS blocklists). Each must score 0 or
# less; the rules that hit are printed for any that does not. It is the
# integration test `spam` (tests/it/spam.rs), which fails when spamassassin is
# missing: on Debian or Ubuntu, `apt-get install spamassassin`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v spamassassin >/dev/null || {
    echo "error: spamassassin is not installed (apt-get install spamassassin)" >&2
    exit 1
}
exec cargo test --test it spam:: -- --nocapture
