/*
 * insncount: a QEMU TCG plugin that counts the guest instructions executed between two marker syscalls.
 *
 * The guest brackets the code to measure with sched_get_priority_max(MARK_START) and
 * sched_get_priority_max(MARK_STOP) (invalid policies: the kernel answers EINVAL and nothing else happens).
 * Every translated block adds its instruction count to a counter inline (no callback per block, so emulation
 * stays fast); the syscall callback reads the counter at each marker and appends one line per window,
 * "<instructions> <vcpu>", to the file named by the plugin argument out=PATH (flushed at once, so a crash later
 * loses nothing). Counting is per translated block: a block that faults part-way is counted whole, which the
 * marked windows (straight-line inference code, no faults) do not hit.
 *
 * Build (host compiler; the header comes from the QEMU source matching the installed qemu-user):
 *   gcc -shared -fPIC -O2 -I<dir with qemu-plugin.h> -o libinsncount.so insncount.c
 * Use:
 *   qemu-aarch64 -plugin ./libinsncount.so,out=/tmp/counts.txt -cpu cortex-a76 prog ...
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define SYS_SCHED_GET_PRIORITY_MAX 125 /* aarch64 (asm-generic) syscall number */
#define MARK_START 0x464b0001          /* "FK" + 1 */
#define MARK_STOP 0x464b0002

static FILE *out;

#if QEMU_PLUGIN_VERSION >= 2
/* QEMU >= 9: per-vCPU scoreboard, so only the marking thread's instructions count. */
static struct qemu_plugin_scoreboard *score;
static qemu_plugin_u64 insns;
static uint64_t count_of(unsigned int vcpu) { return qemu_plugin_u64_get(insns, vcpu); }
#else
/* QEMU < 9: one shared counter; the guest must run the marked window on a single busy thread. */
static uint64_t insns;
static uint64_t count_of(unsigned int vcpu) { (void)vcpu; return __atomic_load_n(&insns, __ATOMIC_RELAXED); }
#endif
#define MAX_VCPUS 1024
static uint64_t started[MAX_VCPUS]; /* counter value at each vCPU's start marker */

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
#if QEMU_PLUGIN_VERSION >= 2
    qemu_plugin_register_vcpu_tb_exec_inline_per_vcpu(tb, QEMU_PLUGIN_INLINE_ADD_U64, insns,
                                                      qemu_plugin_tb_n_insns(tb));
#else
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns, qemu_plugin_tb_n_insns(tb));
#endif
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1, uint64_t a2,
                       uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6, uint64_t a7, uint64_t a8)
{
    (void)id; (void)a2; (void)a3; (void)a4; (void)a5; (void)a6; (void)a7; (void)a8;
    if (num != SYS_SCHED_GET_PRIORITY_MAX || vcpu >= MAX_VCPUS) {
        return;
    }
    if (a1 == MARK_START) {
        started[vcpu] = count_of(vcpu);
    } else if (a1 == MARK_STOP) {
        fprintf(out, "%" PRIu64 " %u\n", count_of(vcpu) - started[vcpu], vcpu);
        fflush(out);
    }
}

static void at_exit(qemu_plugin_id_t id, void *userdata)
{
    (void)id; (void)userdata;
    fclose(out);
#if QEMU_PLUGIN_VERSION >= 2
    qemu_plugin_scoreboard_free(score);
#endif
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            path = argv[i] + 4;
        }
    }
    if (path == NULL) {
        fprintf(stderr, "insncount: missing plugin argument out=PATH\n");
        return -1;
    }
    out = fopen(path, "w");
    if (out == NULL) {
        perror("insncount: cannot open output file");
        return -1;
    }
#if QEMU_PLUGIN_VERSION >= 2
    score = qemu_plugin_scoreboard_new(sizeof(uint64_t));
    insns = qemu_plugin_scoreboard_u64(score);
#endif
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
