/*
 * Keep Triton's restricted-protocol key off its command line.
 *
 * Why: tritonserver 2.51 reads `--grpc-restricted-protocol` / `--http-restricted-api` only from
 * argv, and /proc/<pid>/cmdline is readable by every local user. So the launcher passes these
 * options *without* their `=<key>` tail (`<groups>:<header>`) and preloads this library into
 * tritonserver alone. Triton parses its options with getopt_long and copies each value
 * (`optarg`) into a std::string at once; the wrapper below hands it `<groups>:<header>=<key>`
 * instead, from a heap buffer, so the key is in Triton's memory but never in its argv area (the
 * memory the kernel serves as /proc/<pid>/cmdline), not even for the first milliseconds.
 *
 * Fails closed: without this library (or without a readable, well-formed key) Triton gets the
 * option with no `=`, refuses it ("option format is '<config name>:<setting>=<value>'") and
 * exits, so it never serves with a key anyone could read.
 *
 * The key comes from the 0600 file named by CLINISYNTH_TRITON_ARGV_KEY_FILE. Both that variable
 * and LD_PRELOAD are removed from Triton's environment before main(), so the python-backend
 * stubs it spawns (which run model code) inherit neither the library nor the file's name.
 * Any other program the library is loaded into on the way (unshare, sh, mount) is left alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEY_FILE_ENV "CLINISYNTH_TRITON_ARGV_KEY_FILE"
#define KEY_MIN 16
#define KEY_MAX 256

static char key[KEY_MAX + 1];
static int active; /* 1 in tritonserver once a valid key was read */

typedef int (*getopt_long_fn)(int, char *const[], const char *, const struct option *, int *);

static int is_tritonserver(void)
{
	char exe[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n <= 0)
		return 0;
	exe[n] = '\0';
	const char *base = strrchr(exe, '/');
	return strcmp(base ? base + 1 : exe, "tritonserver") == 0;
}

/* A key Triton can take verbatim in `<groups>:<header>=<key>`: URL-safe base64 only. */
static int key_is_valid(const char *k, size_t len)
{
	if (len < KEY_MIN || len > KEY_MAX)
		return 0;
	for (size_t i = 0; i < len; i++) {
		char c = k[i];
		int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
			 c == '-' || c == '_';
		if (!ok)
			return 0;
	}
	return 1;
}

static void read_key(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	char buf[KEY_MAX + 2];
	size_t len = 0;
	ssize_t n;
	while (len < sizeof buf && (n = read(fd, buf + len, sizeof buf - len)) > 0)
		len += (size_t)n;
	close(fd);
	while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r' || buf[len - 1] == ' '))
		len--;
	if (key_is_valid(buf, len)) {
		memcpy(key, buf, len);
		key[len] = '\0';
		active = 1;
	}
	explicit_bzero(buf, sizeof buf);
}

__attribute__((constructor)) static void argv_key_init(void)
{
	if (!is_tritonserver())
		return;
	const char *path = getenv(KEY_FILE_ENV);
	if (path != NULL)
		read_key(path);
	unsetenv(KEY_FILE_ENV);
	unsetenv("LD_PRELOAD");
}

static int takes_key(const char *name)
{
	return name != NULL &&
	       (strcmp(name, "grpc-restricted-protocol") == 0 || strcmp(name, "http-restricted-api") == 0);
}

int getopt_long(int argc, char *const argv[], const char *optstring, const struct option *longopts,
		int *longind)
{
	static getopt_long_fn real;
	if (real == NULL) {
		real = (getopt_long_fn)dlsym(RTLD_NEXT, "getopt_long");
		if (real == NULL)
			abort();
	}
	int index = -1;
	int rc = real(argc, argv, optstring, longopts, &index);
	if (index >= 0 && longind != NULL)
		*longind = index;
	if (!active)
		return rc;
	if (rc == -1) { /* options parsed: every value was copied, the key is no longer needed */
		explicit_bzero(key, sizeof key);
		active = 0;
		return rc;
	}
	if (index >= 0 && optarg != NULL && takes_key(longopts[index].name) &&
	    strchr(optarg, '=') == NULL) {
		size_t size = strlen(optarg) + 1 + strlen(key) + 1;
		char *value = malloc(size);
		if (value == NULL)
			abort();
		strcpy(value, optarg);
		strcat(value, "=");
		strcat(value, key);
		optarg = value; /* Triton copies it into a std::string; leaked on purpose */
	}
	return rc;
}
