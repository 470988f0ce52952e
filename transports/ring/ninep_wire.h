/*
 * The 9P numbers the compiled ring extension needs, in one place: the message types and header
 * sizes of the Tread/Twrite fast paths (direct.c, xen.c) and of the 9P framing (chain.c, xen.c).
 *
 * Their source is ninep.protocol (numbers.T, HEADER_SIZE, READ_HEADER, the codec's encoding);
 * tests/transports/test_ninep_wire_header.py parses this file and checks every define against it
 * (a NINEP_E<NAME> define, should one be needed, against Python's errno). Add nothing here that the
 * test does not check, and never define a 9P number in a .c file.
 */
#ifndef NINEP_WIRE_H
#define NINEP_WIRE_H

/* size[4] type[1] tag[2]: the header of every message. */
#define NINEP_HEADER 7u
/* size[4] type[1] tag[2] fid[4] offset[8] count[4]: Tread, and Twrite before its data, in every dialect. */
#define NINEP_IO_HEADER 23u
/* size[4] type[1] tag[2] count[4]: Rread before its data, and Rwrite. */
#define NINEP_IO_REPLY_HEADER 11u

#define NINEP_TREAD 116
#define NINEP_RREAD 117
#define NINEP_TWRITE 118
#define NINEP_RWRITE 119

#endif
