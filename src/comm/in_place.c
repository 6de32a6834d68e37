/* The one MPI constant the raw Rust bindings (mpi-sys) lack. MPI_IN_PLACE is
 * a macro whose value differs between implementations (Open MPI: (void *) 1,
 * MPICH: (void *) -1), so it is read from the real <mpi.h> at build time. */
#include <mpi.h>

void *sfron_mpi_in_place(void) { return MPI_IN_PLACE; }
