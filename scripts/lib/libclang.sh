# Finds libclang, the C library that bindgen loads (the rocksdb crate's build needs it).
# Sourced by scripts/setup.sh and by tests/setup_script.rs, which runs it over fake library
# directories. Only `libclang.so`, `libclang.so.N` and `libclang-N.so[.M]` count: Debian's
# libclang-cpp14 ships `libclang-cpp.so.14`, a C++ library bindgen cannot use, and a loose
# glob such as `libclang*.so*` took it for libclang on a fresh machine.

# is_libclang NAME: true when the file name NAME is a libclang that bindgen can load.
is_libclang() {
    [[ "$1" =~ ^libclang(-[0-9]+(\.[0-9]+)*)?\.so(\.[0-9]+)*$ ]]
}

# libclang_in DIR...: prints the first libclang found in the given directories, or fails.
libclang_in() {
    local directory file
    for directory in "$@"; do
        [ -d "$directory" ] || continue
        for file in "$directory"/libclang*; do
            [ -e "$file" ] || continue
            if is_libclang "$(basename "$file")"; then
                echo "$file"
                return 0
            fi
        done
    done
    return 1
}

# libclang_directories: where Debian and LIBCLANG_PATH put libclang on this kind of machine.
libclang_directories() {
    [ -n "${LIBCLANG_PATH:-}" ] && echo "$LIBCLANG_PATH"
    local directory
    for directory in /usr/lib/llvm-*/lib /usr/lib/*-linux-gnu /usr/lib64 /usr/lib /usr/local/lib; do
        [ -d "$directory" ] && echo "$directory"
    done
}
