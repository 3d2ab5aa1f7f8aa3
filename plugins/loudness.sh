#!/bin/sh
# Command plugin `loudness`: EBU R128 loudness, true peak and silences of a media file, printed as one JSON
# object on stdout. Arguments: INPUT [SILENCE_THRESHOLD (default -35dB)] [MIN_SILENCE_SECONDS (default 0.5)].
# It needs only ffmpeg and a POSIX awk; ffmpeg's own messages go to stderr when it fails.
set -eu

input=${1:?usage: loudness.sh INPUT [SILENCE_THRESHOLD] [MIN_SILENCE_SECONDS]}
threshold=${2:--35dB}
min_silence=${3:-0.5}

# Both go into an ffmpeg filter expression, where `:`, `,`, `;` or `[` would add options or whole filters.
case $threshold in
    '' | *[!0-9.dB-]*)
        echo "loudness: silence_threshold must be decibels such as -35dB or a ratio such as 0.02, not '$threshold'" >&2
        exit 2 ;;
esac
case $min_silence in
    '' | *[!0-9.]*)
        echo "loudness: min_silence must be a number of seconds such as 0.5, not '$min_silence'" >&2
        exit 2 ;;
esac

log=$(mktemp)
trap 'rm -f "$log"' EXIT INT TERM

if ! ffmpeg -hide_banner -nostdin -nostats -i "$input" -vn \
    -af "silencedetect=noise=${threshold}:d=${min_silence},loudnorm=print_format=json" \
    -f null - 2>"$log"; then
    tail -n 20 "$log" >&2
    exit 1
fi

awk -v threshold="$threshold" '
    function num(text) { gsub(/[^-0-9.]/, "", text); return text == "" || text == "-" ? "null" : text + 0 }
    /silence_start:/ { split($0, parts, "silence_start: "); start = parts[2] + 0; open = 1 }
    /silence_end:/ {
        split($0, parts, "silence_end: "); split(parts[2], fields, " ");
        end = fields[1] + 0; duration = end - start;
        silences = silences (count++ ? "," : "") sprintf("{\"start\":%.3f,\"end\":%.3f,\"duration\":%.3f}", start, end, duration);
        total += duration; open = 0
    }
    /"input_i"/      { integrated = num($3) }
    /"input_tp"/     { peak = num($3) }
    /"input_lra"/    { range = num($3) }
    /"input_thresh"/ { gate = num($3) }
    END {
        if (open) { silences = silences (count++ ? "," : "") sprintf("{\"start\":%.3f,\"end\":null,\"duration\":null}", start) }
        printf("{\"integrated_lufs\":%s,\"true_peak_dbtp\":%s,\"loudness_range_lu\":%s,\"gate_lufs\":%s,", integrated, peak, range, gate);
        printf("\"silence_threshold\":\"%s\",\"silence_total_s\":%.3f,\"silences\":[%s]}\n", threshold, total, silences);
    }
' "$log"
