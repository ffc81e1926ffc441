/*
 * A tiny libmodbus TCP server: an implementation of Modbus independent of pymodbus,
 * to check our driver against. Registers are preset with known values, the float32
 * ones written by libmodbus' own modbus_set_float_{abcd,cdab,badc,dcba}.
 *
 * Usage: modbus_server PORT   (0 = any free port). Prints "ready PORT" once listening,
 * then serves one client at a time until killed. Reads past the mapping get exception 02
 * from libmodbus itself.
 *
 * Map (PDU addresses):
 *   holding 0/2/4/6   123456.0f as ABCD / CDAB / BADC / DCBA (by shifts)
 *   holding 30/32     modbus_set_float_abcd / _cdab (123456.0f), as libmodbus writes them
 *   holding 8         int16 -1234          holding 9      uint16 54321
 *   holding 10-11     uint32 3000000000, high word first (MODBUS_SET_INT32_TO_INT16)
 *   holding 12-15     int64 -1234567890123 (MODBUS_SET_INT64_TO_INT16)
 *   holding 16        0x8013: bits 0, 1, 4, 15
 *   holding 20-24     "LIBMODBUS" (high byte first, NUL padded)
 *   holding 0..99 mapped; 100.. unmapped
 *   input   0-1       -273.15f ABCD          input 2  uint16 7
 *   coils   0-7       1,0,1,0,0,1,0,1        discrete 0-3  0,1,1,0
 */
#include <arpa/inet.h>
#include <errno.h>
#include <modbus.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uint16_t swap16(uint16_t w) { return (uint16_t)((w << 8) | (w >> 8)); }

/* Registers of a float32 as sent on the wire: high word first unless word_swap,
   high byte first in each register unless byte_swap. */
static void set_float(float f, uint16_t *dest, int word_swap, int byte_swap) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint16_t hi = (uint16_t)(bits >> 16), lo = (uint16_t)(bits & 0xFFFF);
    if (byte_swap) {
        hi = swap16(hi);
        lo = swap16(lo);
    }
    dest[0] = word_swap ? lo : hi;
    dest[1] = word_swap ? hi : lo;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    modbus_t *ctx = modbus_new_tcp("127.0.0.1", port);
    modbus_mapping_t *map = modbus_mapping_new(8, 4, 100, 3);
    if (ctx == NULL || map == NULL) {
        fprintf(stderr, "libmodbus setup failed: %s\n", modbus_strerror(errno));
        return 1;
    }
    set_float(123456.0f, &map->tab_registers[0], 0, 0); /* ABCD */
    set_float(123456.0f, &map->tab_registers[2], 1, 0); /* CDAB */
    set_float(123456.0f, &map->tab_registers[4], 0, 1); /* BADC */
    set_float(123456.0f, &map->tab_registers[6], 1, 1); /* DCBA */
    modbus_set_float_abcd(123456.0f, &map->tab_registers[30]);
    modbus_set_float_cdab(123456.0f, &map->tab_registers[32]);
    map->tab_registers[8] = (uint16_t)(int16_t)-1234;
    map->tab_registers[9] = 54321;
    /* variables, not constants: the macros truncate on purpose */
    uint32_t u32 = 3000000000u;
    int64_t i64 = -1234567890123LL;
    MODBUS_SET_INT32_TO_INT16(map->tab_registers, 10, u32);
    MODBUS_SET_INT64_TO_INT16(map->tab_registers, 12, i64);
    map->tab_registers[16] = 0x8013;
    const char *text = "LIBMODBUS";
    size_t n = strlen(text);
    for (size_t i = 0; i < 5; i++) {
        uint8_t hi = 2 * i < n ? (uint8_t)text[2 * i] : 0;
        uint8_t lo = 2 * i + 1 < n ? (uint8_t)text[2 * i + 1] : 0;
        map->tab_registers[20 + i] = (uint16_t)((hi << 8) | lo);
    }
    set_float(-273.15f, &map->tab_input_registers[0], 0, 0);
    map->tab_input_registers[2] = 7;
    const uint8_t coils[8] = {1, 0, 1, 0, 0, 1, 0, 1};
    memcpy(map->tab_bits, coils, 8);
    const uint8_t inputs[4] = {0, 1, 1, 0};
    memcpy(map->tab_input_bits, inputs, 4);

    int server = modbus_tcp_listen(ctx, 1);
    if (server < 0) {
        fprintf(stderr, "listen failed: %s\n", modbus_strerror(errno));
        return 1;
    }
    struct sockaddr_in addr;
    socklen_t len = sizeof(addr);
    getsockname(server, (struct sockaddr *)&addr, &len);
    printf("ready %d\n", ntohs(addr.sin_port));
    fflush(stdout);

    uint8_t query[MODBUS_TCP_MAX_ADU_LENGTH];
    for (;;) {
        if (modbus_tcp_accept(ctx, &server) < 0) {
            fprintf(stderr, "accept failed: %s\n", modbus_strerror(errno));
            break;
        }
        for (;;) {
            int rc = modbus_receive(ctx, query);
            if (rc > 0) {
                modbus_reply(ctx, query, rc, map);
            } else if (rc == -1) {
                break; /* client gone: accept the next one */
            }
        }
        modbus_close(ctx);
    }
    modbus_mapping_free(map);
    modbus_free(ctx);
    return 0;
}
