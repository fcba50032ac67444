# Shell functions shared by the install scripts; source this file.

# Find the main Debian archive this machine already uses: the first URI whose
# suites include the release codename itself (not -security or -updates).
archive_uri() {
    local codename="$VERSION_CODENAME" file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -e "$file" ] || continue
        awk -v codename="$codename" '
            /^[[:space:]]*$/ { if (uri != "" && suite_ok) { print uri; exit } uri=""; suite_ok=0; next }
            /^URIs:/ { uri=$2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == codename) suite_ok=1 }
            END { if (uri != "" && suite_ok) print uri }
        ' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$file" ] || continue
        awk -v codename="$codename" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == codename) print $i; break } }' "$file"
    done
}
