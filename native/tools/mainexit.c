/*
 * mainexit: a program whose main thread ends with pthread_exit() while a
 * worker still runs. glibc ends the process when its last thread ends, so
 * it must exit (status 0) once the worker returns; an agent that keeps a
 * thread of its own in the process would keep it alive for ever.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

static void *worker(void *arg) {
    (void)arg;
    usleep(200 * 1000);
    printf("worker done\n");
    fflush(stdout);
    return NULL;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) return 1;
    printf("started %d\n", (int)getpid());
    fflush(stdout);
    pthread_exit(NULL);
}
